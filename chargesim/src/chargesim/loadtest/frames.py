"""Frames of the load piles: encoded once with chargeproto, then patched per pile.

A load pile sends the same few frames over and over; only its id, the message id (AP3000)
and the checksum change. Encoding a message with chargeproto costs 3-75 us; copying a
template and patching a few bytes costs about 1 us, which is what lets one generator
process drive 19,000 piles. :func:`check_templates` compares a patched frame with a
fresh chargeproto encoding, so a template cannot drift from the codec.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import struct
from typing import Any, Final

from chargeproto import ap3000, bkv
from chargesim.ap3000 import ap3000_phy_id, iccid_for
from chargesim.bkv import bkv_gateway_id, bkv_iccid_for

#: the id the BKV templates are encoded with; its bytes are searched for and patched
_REFERENCE_GATEWAY: Final = "A1B2C3D4E5F607"
#: AP3000 header: phy id (u32le) at 5, msg id (u16le) at 9 (ap3000.md 2)
_AP3000_PHY_AT: Final = 5
_AP3000_MSG_ID_AT: Final = 9
#: BKV header: seq (u32be) at 6, gateway id (7 bytes) at 11 (bkv.md 2)
_BKV_SEQ_AT: Final = 6
_ICCID_SIZE: Final = 20
#: what the idle load piles report
VOLTAGE_V: Final = 220.0
TEMPERATURE_C: Final = 30
AP3000_SIGNAL: Final = 0
BKV_SIGNAL: Final = 31
BKV_FIRMWARE: Final = "cV.1r46"
SOCKET_FIRMWARE: Final = 0x5136
STATUS_IDLE: Final = 0x80
DEVICE_TZ: Final = dt.timezone(dt.timedelta(hours=8))


@dataclasses.dataclass(frozen=True, slots=True)
class FrameTemplate:
    """One encoded frame and where its per-pile bytes sit.

    ``build`` copies the frame, writes the pile's id at every ``id_offsets``, its ICCID
    (20 ASCII characters) at every ``iccid_offsets``, the sequence number at
    ``seq_offset`` (AP3000: msg id u16le; BKV: seq u32be), and recomputes the checksum.
    """

    protocol: str
    frame: bytes
    id_offsets: tuple[int, ...]
    id_size: int
    iccid_offsets: tuple[int, ...] = ()
    seq_offset: int = -1

    def build(self, ident: bytes, seq: int = 0, iccid: bytes = b"") -> bytearray:
        """The frame for one pile."""
        buf = bytearray(self.frame)
        size = self.id_size
        for at in self.id_offsets:
            buf[at : at + size] = ident
        for at in self.iccid_offsets:
            buf[at : at + _ICCID_SIZE] = iccid
        view = memoryview(buf)
        if self.protocol == "ap3000":
            if self.seq_offset >= 0:
                struct.pack_into("<H", buf, self.seq_offset, seq)
            struct.pack_into("<H", buf, len(buf) - 2, sum(view[:-2]) & 0xFFFF)
        else:
            if self.seq_offset >= 0:
                struct.pack_into(">I", buf, self.seq_offset, seq)
            buf[-3] = sum(view[2:-3]) & 0xFF
        view.release()
        return buf


def _occurrences(frame: bytes, needle: bytes) -> tuple[int, ...]:
    found: list[int] = []
    at = frame.find(needle)
    while at >= 0:
        found.append(at)
        at = frame.find(needle, at + len(needle))
    return tuple(found)


def ap3000_template(message: ap3000.Ap3000Message) -> FrameTemplate:
    """A template of an AP3000 frame: phy id and msg id patched, checksum recomputed."""
    return FrameTemplate(
        "ap3000",
        ap3000.encode(message),
        id_offsets=(_AP3000_PHY_AT,),
        id_size=4,
        seq_offset=_AP3000_MSG_ID_AT,
    )


def bkv_template(message: bkv.BkvMessage) -> FrameTemplate:
    """A template of a BKV frame encoded for the reference gateway: every occurrence
    of the gateway id (header and TLV items) and of its ICCID is patched."""
    if message.gateway_id != _REFERENCE_GATEWAY:
        raise ValueError("BKV templates are encoded for the reference gateway id")
    frame = bkv.encode(message)
    iccid = bkv_iccid_for(_REFERENCE_GATEWAY).encode("ascii")
    return FrameTemplate(
        "bkv",
        frame,
        id_offsets=_occurrences(frame, bytes.fromhex(_REFERENCE_GATEWAY)),
        id_size=7,
        iccid_offsets=_occurrences(frame, iccid),
        seq_offset=_BKV_SEQ_AT,
    )


# --- identities ------------------------------------------------------------------------


def ap3000_identity(number: int, ports: int) -> tuple[str, bytes, bytes]:
    """(phy id, its 4 wire bytes, ICCID preamble) of AP3000 load pile ``number``."""
    phy_id = ap3000_phy_id(number, ports)
    return phy_id, int(phy_id, 16).to_bytes(4, "little"), iccid_for(phy_id).encode("ascii")


def bkv_identity(number: int) -> tuple[str, bytes, bytes]:
    """(gateway id, its 7 wire bytes, ICCID) of BKV load gateway ``number``."""
    gateway_id = bkv_gateway_id(number)
    return gateway_id, bytes.fromhex(gateway_id), bkv_iccid_for(gateway_id).encode("ascii")


# --- the messages the load piles send ----------------------------------------------------


def ap3000_registration(phy_id: str, msg_id: int, ports: int) -> ap3000.Registration:
    """The 0x20 a load pile sends after connecting (a dual-mode GM5 model)."""
    return ap3000.Registration(
        phy_id,
        msg_id,
        firmware_version=312,
        port_count=ports,
        virtual_id=0,
        device_type=0x27,
        work_mode=0,
        power_board_version=0,
    )


def ap3000_heartbeat(phy_id: str, msg_id: int, ports: int) -> ap3000.Heartbeat:
    """A 0x21 heartbeat with every port idle (status 0)."""
    return ap3000.Heartbeat(
        phy_id,
        msg_id,
        voltage_v=VOLTAGE_V,
        ports=tuple(ap3000.PortState(i, 0) for i in range(ports)),
        signal_strength=AP3000_SIGNAL,
        temperature_c=TEMPERATURE_C,
    )


def bkv_heartbeat(gateway_id: str) -> bkv.Heartbeat:
    """A 0x0000 gateway heartbeat (seq 0) carrying the gateway's ICCID."""
    return bkv.Heartbeat(
        gateway_id,
        0,
        iccid=bkv_iccid_for(gateway_id),
        firmware_version=BKV_FIRMWARE,
        signal_strength=BKV_SIGNAL,
    )


def bkv_connect_report(gateway_id: str, socket: int, clock: dt.datetime) -> bkv.TlvContainer:
    """The undocumented 0x1000/0x1013 real gateways send per socket after connecting."""
    return bkv.TlvContainer(
        gateway_id,
        0,
        bkv_seq=0,
        bkv_gateway_id=gateway_id,
        bkv_cmd=0x1013,
        raw_items=(
            bkv.TlvItem(0x4A, "%02X" % socket),
            bkv.TlvItem(0x08, "7F"),
            bkv.TlvItem(0x06, clock.strftime("%Y%m%d%H%M%S")),
            bkv.TlvItem(0x5A, "0000"),
        ),
    )


def bkv_idle_jacks() -> dict[str, Any]:
    """The reported values of an idle jack."""
    return {
        "status_bits": STATUS_IDLE,
        "business_no": 0,
        "voltage_v": VOLTAGE_V,
        "power_w": 0.0,
        "current_a": 0.0,
        "energy_kwh": 0.0,
        "duration_min": 0,
    }


def bkv_status_cluster(gateway_id: str, socket: int) -> bkv.StatusCluster:
    """A 0x1000/0x1017 status cluster of one socket with two idle jacks (seq 0)."""
    group = bkv.SocketStatus(
        socket=socket,
        firmware_version=SOCKET_FIRMWARE,
        temperature_c=TEMPERATURE_C,
        signal_strength=BKV_SIGNAL,
        ports=tuple(bkv.JackStatus(port=i, **bkv_idle_jacks()) for i in (0, 1)),
    )
    return bkv.StatusCluster.create(gateway_id, 0, sockets=(group,))


def bkv_socket_state(gateway_id: str, seq: int, socket: int) -> bkv.SocketState:
    """The 0x1C state of a socket with two idle jacks (the answer to a 0x1D query)."""
    return bkv.SocketState(
        gateway_id,
        seq,
        socket=socket,
        firmware_version=SOCKET_FIRMWARE,
        temperature_c=TEMPERATURE_C,
        signal_strength=BKV_SIGNAL,
        ports=tuple(bkv.JackState(port=i, **bkv_idle_jacks()) for i in (0, 1)),
    )


class Ap3000Frames:
    """Templates of the frames an AP3000 load pile with ``ports`` ports sends."""

    def __init__(self, ports: int) -> None:
        self.ports = ports
        reference = ap3000_phy_id(1, ports)
        self.registration = ap3000_template(ap3000_registration(reference, 0, ports))
        self.heartbeat = ap3000_template(ap3000_heartbeat(reference, 0, ports))
        self.time_request = ap3000_template(ap3000.TimeRequest(reference, 0))

    def expected(self, phy_id: str, msg_id: int) -> dict[str, ap3000.Ap3000Message]:
        """The messages the templates stand for, for one pile (for checks)."""
        return {
            "registration": ap3000_registration(phy_id, msg_id, self.ports),
            "heartbeat": ap3000_heartbeat(phy_id, msg_id, self.ports),
            "time_request": ap3000.TimeRequest(phy_id, msg_id),
        }


class BkvFrames:
    """Templates of the frames a BKV load gateway with ``sockets`` sockets sends.

    The 0x1013 connect reports carry the clock of the moment the templates were built.
    """

    def __init__(self, sockets: int, clock: dt.datetime | None = None) -> None:
        self.sockets = sockets
        self.clock = clock or dt.datetime.now(DEVICE_TZ).replace(tzinfo=None, microsecond=0)
        ref = _REFERENCE_GATEWAY
        self.heartbeat = bkv_template(bkv_heartbeat(ref))
        numbers = range(1, sockets + 1)
        self.connect_reports = [
            bkv_template(bkv_connect_report(ref, n, self.clock)) for n in numbers
        ]
        self.status_clusters = [bkv_template(bkv_status_cluster(ref, n)) for n in numbers]

    def expected(self, gateway_id: str) -> dict[str, bkv.BkvMessage]:
        """The messages the templates stand for, for one gateway (for checks)."""
        out: dict[str, bkv.BkvMessage] = {"heartbeat": bkv_heartbeat(gateway_id)}
        for n in range(1, self.sockets + 1):
            out[f"connect_report_{n}"] = bkv_connect_report(gateway_id, n, self.clock)
            out[f"status_cluster_{n}"] = bkv_status_cluster(gateway_id, n)
        return out


def check_templates(ap: Ap3000Frames, bk: BkvFrames, number: int = 1) -> None:
    """Raise ``AssertionError`` unless the patched frames of pile/gateway ``number``
    equal chargeproto's own encoding of the same messages."""
    phy_id, phy, _ = ap3000_identity(number, ap.ports)
    expected_ap = ap.expected(phy_id, 0x1234)
    built_ap = {
        "registration": ap.registration.build(phy, 0x1234),
        "heartbeat": ap.heartbeat.build(phy, 0x1234),
        "time_request": ap.time_request.build(phy, 0x1234),
    }
    for name, frame in built_ap.items():
        want = ap3000.encode(expected_ap[name])
        if bytes(frame) != want:
            raise AssertionError(f"AP3000 {name} template: {frame.hex()} != {want.hex()}")
    gateway_id, gw, iccid = bkv_identity(number)
    expected_bkv = bk.expected(gateway_id)
    built_bkv = {"heartbeat": bk.heartbeat.build(gw, 0, iccid)}
    for n in range(1, bk.sockets + 1):
        built_bkv[f"connect_report_{n}"] = bk.connect_reports[n - 1].build(gw, 0, iccid)
        built_bkv[f"status_cluster_{n}"] = bk.status_clusters[n - 1].build(gw, 0, iccid)
    for name, frame in built_bkv.items():
        want = bkv.encode(expected_bkv[name])
        if bytes(frame) != want:
            raise AssertionError(f"BKV {name} template: {frame.hex()} != {want.hex()}")
