"""Firmware upgrade helpers: packets, the check packet, and reply sequences (9.22-10.6)."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from typing import Any, Final

from .._base import Item
from .._errors import EncodeError

CHECK_MAGIC: Final = bytes.fromhex("A1A2A3A4A5A6A7A8")
_CHECK = struct.Struct("<8sIBH")

#: packet size per upgrade command
PACKET_SIZE: Final = {0xE0: 200, 0xE1: 200, 0xE2: 200, 0xFA: 200, 0xF8: 256, 0xF9: 256}


@dataclasses.dataclass(frozen=True, slots=True)
class CheckPacket(Item):
    """The optional last packet that lets a device verify the transfer."""

    image_checksum: int
    device_type: int
    firmware_version: int


def image_checksum(image: bytes) -> int:
    """u32 sum of the image bytes, without the padding of the last packet (13.10)."""
    return sum(image) & 0xFFFFFFFF


def build_check_packet(
    image: bytes, device_type: int, firmware_version: int, size: int = 200
) -> bytes:
    """The check packet for ``image``: magic, checksum, device type, version, zeros."""
    if not 0 <= device_type <= 0xFF or not 0 <= firmware_version <= 0xFFFF:
        raise EncodeError("device_type must be a byte and firmware_version a u16")
    head = _CHECK.pack(CHECK_MAGIC, image_checksum(image), device_type, firmware_version)
    return head.ljust(size, b"\0")


def parse_check_packet(packet: bytes) -> CheckPacket | None:
    """The check packet's fields, or None when ``packet`` is an ordinary image slice."""
    if len(packet) < _CHECK.size or not packet.startswith(CHECK_MAGIC):
        return None
    _, checksum, device_type, version = _CHECK.unpack_from(packet)
    return CheckPacket(checksum, device_type, version)


def split_image(
    image: bytes,
    *,
    packet_size: int = 200,
    check_packet: tuple[int, int] | None = None,
    padding: int = 0,
) -> list[tuple[int, int, bytes]]:
    """Cut ``image`` into ``(total_packets, packet_index, slice)`` triples, 1-based.

    The last slice is padded with ``padding`` to ``packet_size``. With
    ``check_packet=(device_type, firmware_version)`` a check packet is appended and
    counted in ``total_packets``. 640 bytes at 200 per packet -> 4 packets (+1).
    """
    if not image:
        raise EncodeError("the firmware image is empty")
    if packet_size <= 0:
        raise EncodeError("packet_size must be positive")
    slices = [
        image[i : i + packet_size].ljust(packet_size, bytes([padding]))
        for i in range(0, len(image), packet_size)
    ]
    if check_packet is not None:
        slices.append(build_check_packet(image, *check_packet, size=packet_size))
    total = len(slices)
    if total > 0xFFFF:
        raise EncodeError("the image needs more than 65535 packets")
    return [(total, index, data) for index, data in enumerate(slices, start=1)]


@dataclasses.dataclass(frozen=True, slots=True)
class UpgradeProgress:
    """What a sequence of device replies says about a transfer."""

    complete: bool
    next_packet: int
    errors: tuple[str, ...]

    def to_fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verify_replies(total_packets: int, replies: Iterable[tuple[int, int]]) -> UpgradeProgress:
    """Check a device's ``(result, packet_index)`` replies against the protocol.

    Every successful reply must acknowledge the next packet in order (1, 2, ...);
    an error result asks for the same packet again. Returns whether the transfer is
    complete, which packet to send next, and what was out of order.
    """
    expected = 1
    errors: list[str] = []
    for result, index in replies:
        if result == 0:
            if index != expected:
                errors.append(f"acknowledged packet {index}, expected {expected}")
                continue
            expected += 1
        elif index not in (expected, expected - 1, 0):
            errors.append(f"error result {result} for packet {index}, expected {expected}")
    return UpgradeProgress(expected > total_packets, min(expected, total_packets), tuple(errors))
