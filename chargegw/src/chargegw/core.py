"""Protocol-neutral domain vocabulary: device ids, port states, event kinds."""

from __future__ import annotations

import enum

from chargeproto import shared_text


class PortStatus(str, enum.Enum):
    """A port's state, the same words for both protocols (the raw code is kept beside)."""

    IDLE = "idle"
    CHARGING = "charging"
    #: a charger is plugged in but not charging (not started yet)
    OCCUPIED = "occupied"
    #: plugged in, battery full
    FULL = "full"
    #: float (trickle) charging after full
    FLOAT = "float"
    FAULT = "fault"
    UNKNOWN = "unknown"


#: AP3000 port status (ap3000.md 11.1) -> neutral status
AP3000_PORT_STATUS: dict[int, PortStatus] = {
    0x00: PortStatus.IDLE,
    0x01: PortStatus.CHARGING,
    0x02: PortStatus.OCCUPIED,
    0x03: PortStatus.FULL,
    0x05: PortStatus.FLOAT,
    **{
        code: PortStatus.FAULT
        for code in (0x04, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0D, 0x0E, 0x0F, 0x10)
    },
}

#: AP3000 0x06 charging status (11.3) -> neutral status; other values are ignored
AP3000_CHARGING_STATUS: dict[int, PortStatus] = {
    1: PortStatus.CHARGING,
    2: PortStatus.OCCUPIED,
    3: PortStatus.FULL,
    5: PortStatus.FLOAT,
}


class EventKind(str, enum.Enum):
    """Kinds of rows in the device event log."""

    ONLINE = "online"
    OFFLINE = "offline"
    REGISTERED = "registered"
    REBOUND = "rebound"
    ALARM = "alarm"
    SETTLEMENT = "settlement"
    CARD_SWIPE = "card_swipe"
    COMMAND_REPLY = "command_reply"
    #: a command gave up: no answer after its resend, or the device stayed offline
    COMMAND_DEAD = "command_dead"
    REPORT = "report"
    #: a firmware upgrade began sending to the device (firmware.py)
    UPGRADE_STARTED = "upgrade_started"
    #: the device came back from its upgrade reporting the new version
    UPGRADE_VERIFIED = "upgrade_verified"
    #: an upgrade was refused before sending, gave up, or the version did not change
    UPGRADE_FAILED = "upgrade_failed"
    #: a parameter group was read back as desired (or, without a read-back, acknowledged)
    PARAM_VERIFIED = "param_verified"
    #: the read-back after setting a parameter group differs from the desired values
    PARAM_MISMATCH = "param_mismatch"
    #: the device refused a parameter group, or its set or read-back command died
    PARAM_FAILED = "param_failed"
    #: a device reports other values than were verified or desired (after a reconnect,
    #: a registration or a read-back); re-applied when ``params_reapply_on_drift``
    PARAM_DRIFT = "param_drift"


def bkv_device_id(gateway_id: str, socket_no: int) -> str:
    """The canonical id of a BKV socket: ``<gateway_id>-<socket_no>`` (decimal); one
    copy per id however many frames name it (kept by many tables per device)."""
    return shared_text(f"{gateway_id}-{socket_no}")


def split_device_id(device_id: str) -> tuple[str, int | None]:
    """``"82231214002700-1"`` -> (gateway, 1); ``"04CEAA40"`` -> ("04CEAA40", None)."""
    gateway, sep, socket = device_id.rpartition("-")
    if sep and socket.isdigit():
        return gateway, int(socket)
    return device_id, None
