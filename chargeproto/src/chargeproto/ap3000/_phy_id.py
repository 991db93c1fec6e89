"""AP3000 physical ids: wire bytes, the QR sticker number, and the canonical string."""

from __future__ import annotations

import dataclasses
import re

from .._errors import EncodeError, HexSyntaxError

_CANONICAL = re.compile(r"^[0-9A-Fa-f]{8}$")

#: id type codes of ap3000.md section 4
PHY_ID_TYPES = {
    0x03: "single-port socket",
    0x04: "dual-port socket",
    0x05: "10-port pile",
    0x06: "16-port pile",
    0x07: "12-port pile",
    0x09: "host",
    0x0A: "leakage-protection host",
}


@dataclasses.dataclass(frozen=True, slots=True)
class PhysicalId:
    """A physical id. ``value`` is the little-endian u32 of the wire bytes."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= 0xFFFFFFFF:
            raise EncodeError(f"physical id {self.value:#x} is not a u32", field="phy_id")

    @classmethod
    def from_wire(cls, data: bytes) -> PhysicalId:
        """From the 4 bytes as they appear in a frame (offset 5)."""
        if len(data) != 4:
            raise EncodeError("a physical id is 4 bytes", field="phy_id")
        return cls(int.from_bytes(data, "little"))

    @classmethod
    def parse(cls, text: str) -> PhysicalId:
        """From the canonical string ``"04CEAA40"`` (most significant byte first)."""
        if not _CANONICAL.match(text):
            raise HexSyntaxError(f"physical id must be 8 hex digits, got {text!r}")
        return cls(int(text, 16))

    @classmethod
    def from_qr(cls, text: str) -> PhysicalId:
        """From the wire-order hex string of a QR URL (``"40aace04"``)."""
        if not _CANONICAL.match(text):
            raise HexSyntaxError(f"QR id must be 8 hex digits, got {text!r}")
        return cls.from_wire(bytes.fromhex(text))

    @classmethod
    def from_sticker(cls, type_code: int, number: int) -> PhysicalId:
        """From the type code and the decimal number printed under the QR code."""
        if not 0 <= type_code <= 0xFF:
            raise EncodeError(f"type code {type_code} is not a byte", field="phy_id_type")
        if not 0 <= number <= 0xFFFFFF:
            raise EncodeError(f"device number {number} exceeds 24 bits", field="phy_id_number")
        return cls(type_code << 24 | number)

    @property
    def canonical(self) -> str:
        """``"04CEAA40"``: the canonical device id."""
        return "%08X" % self.value

    @property
    def type_code(self) -> int:
        """The most significant byte: the kind of device."""
        return self.value >> 24

    @property
    def number(self) -> int:
        """The low 24 bits: the decimal number on the sticker."""
        return self.value & 0xFFFFFF

    @property
    def wire(self) -> bytes:
        """The 4 bytes as sent in a frame."""
        return self.value.to_bytes(4, "little")

    @property
    def qr(self) -> str:
        """The wire order in lowercase hex, as in the QR URL."""
        return self.wire.hex()

    @property
    def type_text(self) -> str:
        """What the type code means (ap3000.md section 4)."""
        return PHY_ID_TYPES.get(self.type_code, f"unknown (0x{self.type_code:02X})")

    def fields(self) -> dict[str, object]:
        """The canonical frame-level names: phy_id, phy_id_type, phy_id_number, phy_id_qr."""
        return {
            "phy_id": self.canonical,
            "phy_id_type": self.type_code,
            "phy_id_number": self.number,
            "phy_id_qr": self.qr,
        }

    def __str__(self) -> str:
        return self.canonical
