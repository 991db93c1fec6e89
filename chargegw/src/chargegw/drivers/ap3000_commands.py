"""AP3000 commands: protocol-neutral requests -> 0x82/0x8A/0x81/... frames, and replies.

A reply is matched by (physical id, command, msg id) (ap3000.md 3). 0x81 has no reply
of its own: the device answers by sending 0x20/0x21, which acknowledge the query.
"""

from __future__ import annotations

from typing import Any

from chargegw.core import split_device_id
from chargegw.domain.outbox import Outcome
from chargegw.domain.ports import command_name
from chargeproto import EncodeError, Message, ap3000

#: firmware packets go through an upgrade job, never one by one from the API
_FIRMWARE = {
    ap3000.SubDeviceFirmwarePacket,
    ap3000.PowerBoardFirmwarePacket,
    ap3000.HostSetFirmwarePacket,
    ap3000.LegacyFirmwarePacket,
    ap3000.HostLegacyFirmwarePacket,
    ap3000.HostFirmwareUpgrade,
}
#: commands with their own endpoints (start, stop, modify, query)
_DEDICATED = {ap3000.ChargeControl, ap3000.ModifyChargeLimit, ap3000.QueryStatus}
#: placeholders without a defined meaning (ap3000.md 9.25): not offered
_RESERVED = {ap3000.ReservedFD, ap3000.ReservedFE}
#: upgrade job commands (firmware.py) -> packet class; params ``total_packets``,
#: ``packet_index``, ``firmware`` (hex), and ``phy_id`` when the frame is for a host
#: (queued under a device behind it, sent on the host's connection)
FIRMWARE_COMMANDS: dict[str, type[ap3000.Ap3000Message]] = {
    "firmware_0xe0": ap3000.SubDeviceFirmwarePacket,
    "firmware_0xe1": ap3000.PowerBoardFirmwarePacket,
    "firmware_0xe2": ap3000.HostSetFirmwarePacket,
    "firmware_0xf8": ap3000.LegacyFirmwarePacket,
    "firmware_0xf9": ap3000.HostLegacyFirmwarePacket,
    "firmware_0xfa": ap3000.HostFirmwareUpgrade,  # without packet fields: the trigger
}


#: name -> message class of every command the generic endpoint accepts
GENERIC: dict[str, type[ap3000.Ap3000Message]] = {
    command_name(cls): cls
    for cls in ap3000.MESSAGE_CLASSES
    if cls.direction is ap3000.ChargeControl.direction
    and not ap3000.is_server_reply(cls)
    and cls not in _FIRMWARE | _DEDICATED | _RESERVED
}


def build(device_id: str, name: str, params: dict[str, Any], msg_id: int) -> ap3000.Ap3000Message:
    """The message for a command; ``EncodeError`` when the parameters do not fit."""
    if name in ("start", "stop"):
        return ap3000.ChargeControl(
            phy_id=device_id,
            msg_id=msg_id,
            rate_mode=params.get("rate_mode", 0),
            balance_or_expiry=params.get("balance_cent", 0),
            port=params["port"],
            charge_command=1 if name == "start" else 0,
            charge_limit=params.get("charge_limit", 0),
            order_id=params["order_id"],
            max_charge_duration_s=0,
            overload_power_w=0.0,
        )
    if name == "modify":
        return ap3000.ModifyChargeLimit(
            phy_id=device_id,
            msg_id=msg_id,
            rate_mode=params["rate_mode"],
            port=params["port"],
            charge_limit=params["charge_limit"],
        )
    if name == "query":
        return ap3000.QueryStatus(phy_id=device_id, msg_id=msg_id)
    packet = FIRMWARE_COMMANDS.get(name)
    if packet is not None:
        return packet.from_fields({"phy_id": device_id, **params, "msg_id": msg_id})
    cls = GENERIC.get(name)
    if cls is None:
        raise EncodeError(f"unknown AP3000 command {name!r}", field="command")
    return cls.from_fields({**params, "phy_id": device_id, "msg_id": msg_id})


def validate(device_id: str, name: str, params: dict[str, Any]) -> None:
    """Raise ``EncodeError`` (with the field) if the command cannot be sent."""
    try:
        ap3000.encode(build(device_id, name, params, 0))
    except KeyError as exc:
        raise EncodeError(f"missing parameter {exc.args[0]}", field=str(exc.args[0])) from None


def reply_key(device_id: str, command: int, msg_id: int) -> tuple[str, int, int]:
    return (device_id, command, msg_id)


def query_key(device_id: str) -> tuple[str, str]:
    return (device_id, "query")


def outcome(message: Message) -> Outcome:
    """Success, result code and its meaning from a device's reply."""
    result = getattr(message, "result", None)
    fields = message.to_fields()
    if not isinstance(result, int):
        return Outcome(True, None, None, fields)
    text = fields.get("result_text")
    return Outcome(result == 0, result, text if isinstance(text, str) else None, fields)


class Ap3000Commands:
    """The outbox's view of AP3000: frames out, reply keys."""

    #: msg ids are u16; 0 is never used
    max_correlation = 0xFFFF

    def correlation_scope(self, device_id: str, params: dict[str, Any]) -> str:
        """The pile (or the host a host frame goes to) whose msg ids must not repeat."""
        return str(params.get("phy_id") or device_id)

    def validate(self, device_id: str, name: str, params: dict[str, Any]) -> None:
        """``EncodeError`` (with the field) if the command cannot be sent to the pile
        ``device_id`` (``ports.CommandCheck``)."""
        validate(split_device_id(device_id)[0], name, params)

    def encode_command(
        self, device_id: str, name: str, params: dict[str, Any], correlation: int
    ) -> tuple[bytes, Any]:
        message = build(device_id, name, params, correlation)
        if name == "query":  # answered by a status report, not by a 0x81
            return ap3000.encode(message), query_key(device_id)
        if ap3000.reply_for(message) is None:  # e.g. 0xE4: done once written
            return ap3000.encode(message), None
        # a host's frame is answered by the host (its phy id), not by the device queued
        return ap3000.encode(message), reply_key(message.phy_id, message.command, correlation)
