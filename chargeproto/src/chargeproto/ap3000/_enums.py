"""Meanings of the AP3000 enumeration codes (ap3000.md section 11).

Codes outside these tables are legal on the wire: real piles send them. They decode
as their number with the text ``unknown (0x..)``.
"""

from __future__ import annotations

from collections.abc import Mapping

PORT_STATUS: Mapping[int, str] = {
    0x00: "idle",
    0x01: "charging",
    0x02: "charger connected, not charging (not started)",
    0x03: "charger connected, not charging (battery full)",
    0x04: "port cannot meter",
    0x05: "float charging",
    0x06: "storage damaged",
    0x07: "socket contact spring stuck",
    0x08: "poor contact or blown fuse",
    0x09: "relay welded",
    0x0A: "Hall switch broken",
    0x0B: "pre-check: relay broken or fuse blown",
    0x0D: "pre-check: load short-circuited",
    0x0E: "filtering pre-check: relay welded",
    0x0F: "card-reader chip fault",
    0x10: "detection circuit fault",
}

STOP_REASON: Mapping[int, str] = {
    0x01: "full, stopped by itself",
    0x02: "maximum charging time reached",
    0x03: "preset time reached",
    0x04: "preset energy reached",
    0x05: "user unplugged",
    0x06: "load too high",
    0x07: "stopped by the server",
    0x08: "dynamic overload",
    0x09: "power too low",
    0x0A: "ambient temperature too high",
    0x0B: "port temperature too high",
    0x0C: "over-current",
    0x0D: "user unplugged (socket spring possibly stuck)",
    0x0E: "no power drawn (poor contact or blown fuse)",
    0x0F: "pre-check: relay broken or fuse blown",
    0x10: "water immersion, power cut",
    0x11: "fire suppression, settled (this port)",
    0x12: "fire suppression, settled (another port)",
    0x13: "cabinet opened with the user's password",
    0x14: "cabinet door not properly closed",
    0x15: "stopped by an external operation",
    0x16: "stopped by a card swipe",
    0x17: "forced stop by the server",
    0x18: "fire-protection system triggered",
    0x19: "storage error",
    0x1A: "over-voltage",
    0x1B: "under-voltage",
    0x1C: "low-power cut-off",
}

CHARGING_STATUS: Mapping[int, str] = {
    1: "charging",
    2: "waiting for the charger (cabinets)",
    3: "battery full",
    5: "float charging",
}

START_MODE: Mapping[int, str] = {
    0: "offline start by card",
    1: "online start by the server",
    3: "verification-code start",
}

CARD_TYPE: Mapping[int, str] = {
    0: "old card (user-card key)",
    1: "new card (blank-card key)",
    2: "balance card",
    3: "UID only",
    4: "social-security card",
}

ACCOUNT_STATUS: Mapping[int, str] = {
    0x00: "normal",
    0x01: "card not registered",
    0x02: "please bind the card",
    0x03: "please unbind the card",
    0x04: "monthly user swiped again",
    0x05: "monthly user exceeded the number of uses",
    0x06: "insufficient balance",
    0x07: "monthly plan expired",
    0x08: "port fault",
    0x09: "clear the balance card and switch its key",
    0x0A: "monthly user exceeded the duration limit",
    0x0B: "card belongs to another operator account",
    0x0C: "device not registered",
    0x0D: "please buy a monthly plan",
    0x0E: "charging outside the card's area, insufficient balance",
    0x0F: "monthly-plan device, cannot be used",
    0x10: "monthly-plan device, cannot be used outside its area",
    0x11: "temporary device, cannot be used",
    0x12: "temporary device, cannot be used outside its area",
}

RATE_MODE: Mapping[int, str] = {
    0: "time-based",
    1: "monthly",
    2: "energy-based",
    3: "per use",
}

MODIFY_RATE_MODE: Mapping[int, str] = {
    0: "timed, no stop when full",
    1: "timed, stop when full",
    2: "energy, stop when full",
}

CHARGE_RESULT: Mapping[int, str] = {
    0x00: "done",
    0x01: "no charger plugged into the port",
    0x02: "port already in the requested state",
    0x03: "port fault",
    0x04: "no such port",
    0x05: "several ports have a charger waiting",
    0x06: "over the device's total power",
    0x07: "storage damaged",
    0x08: "pre-check: relay broken or fuse blown",
    0x09: "pre-check: relay welded",
    0x0A: "pre-check: load short-circuited",
    0x0B: "smoke alarm",
    0x0C: "over-voltage",
    0x0D: "under-voltage",
    0x0E: "no response",
}

MODIFY_RESULT: Mapping[int, str] = {
    0: "done",
    1: "port not charging",
    2: "value below the amount already delivered",
    3: "no such rate mode or port",
}

DEVICE_TYPE: Mapping[int, str] = {
    0x01: "old RS-485 / old 10-port (1)",
    0x02: "old LoRa",
    0x03: "old RS-485 / old 10-port (3)",
    0x04: "old 10/16-port",
    0x05: "old LoRa, high power",
    0x06: "old RS-485",
    0x07: "old RS-485, high power",
    0x08: "old NB",
    0x09: "old NB, high power",
    0x0A: "old wireless",
    0x0B: "old wireless, high power",
    0x10: "new RS-485",
    0x14: "new NB",
    0x20: "new 10/16-port",
    0x21: "new RS-485 dual-mode",
    0x22: "new NB dual-mode",
    0x23: "new GM35 dual-mode",
    0x24: "new WiFi dual-mode",
    0x25: "new LoRa dual-mode",
    0x26: "new HW3000 dual-mode",
    0x27: "new GM5 dual-mode",
    0x28: "new RS-485 dual-mode F460",
    0x29: "new 10/16-port F460",
    0x30: "new 12-port F460",
    0x70: "oldest 10/16-port",
    0x71: "oldest 10/16-port (Dipeng)",
}

ALARM_TYPE: Mapping[int, str] = {
    1: "power failure",
    2: "water immersion",
    3: "hot-melt glue triggered",
    4: "smoke alarm",
    5: "temperature alarm",
    6: "water-level alarm",
    7: "cabinet door sprang open",
}

TC_CARD_MODE: Mapping[int, str] = {
    0x00: "time-based",
    0x01: "per use",
    0x03: "energy-based",
    0x04: "fixed charge",
    0x05: "home mode",
    0x06: "free selection",
}

UPGRADE_RESULT: Mapping[int, str] = {
    0x00: "success, send the next packet",
    0x01: "packet error, resend",
    0x02: "firmware image checksum wrong",
    0x03: "wrong device type",
    0x04: "no check packet",
    0x05: "packet-0 authentication failed",
}

LEGACY_UPGRADE_RESULT: Mapping[int, str] = {0: "success", 1: "error, resend the current packet"}

HOST_TYPE: Mapping[int, str] = {
    0x01: "old RS-485",
    0x02: "old LoRa",
    0x03: "new LoRa",
    0x04: "433 MHz wireless",
    0x05: "AP262 LoRa",
    0x50: "AP262 combined host",
    0x51: "leakage-protection host",
}

RTC_TYPE: Mapping[int, str] = {0: "no RTC", 1: "SD2068", 2: "BM8563"}

MODEM_TYPE: Mapping[int, str] = {
    0x01: "WiFi (B2)",
    0x02: "2G (GM3)",
    0x03: "4G (7S4/G405)",
    0x04: "2G (GM35)",
    0x05: "NB-IoT (M5311)",
    0x06: "4G Cat-1 (GM5)",
    0x07: "4G Cat-1 (GM5, OpenCPU)",
    0x08: "4G Cat-1 (GM6)",
}

SERVER_MODEM_TYPE: Mapping[int, str] = {1: "WiFi", 2: "2G", 3: "4G"}

RESULT_OK: Mapping[int, str] = {0: "done"}
