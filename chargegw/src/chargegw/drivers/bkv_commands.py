"""BKV commands: protocol-neutral requests -> 0x0015/0x0005/0x1000 frames, and replies.

A device is one socket of a gateway (``<gateway_id>-<socket>``). The outer frame's
``seq`` (u32) is the correlation id; a reply is matched by (gateway id, seq, outer
command, sub-command or BKV command id) (bkv.md 3). A 0x1D query is answered either by
the documented 0x1C state or, as real gateways do, by an unsolicited 0x1017 status
cluster (seq 0) about that socket (bkv.md 15): both acknowledge it (:func:`query_key`).
BKV success is ``result == 1`` (bkv.md 11.1).
"""

from __future__ import annotations

from typing import Any

from chargegw.core import split_device_id
from chargegw.domain.outbox import Outcome
from chargegw.domain.ports import command_name
from chargeproto import EncodeError, Message, bkv

#: 0x0015/0x07 ``charge_mode`` (its own coding, bkv.md 7.2 / 11.2)
BY_TIME = 1
BY_ENERGY = 0
#: 0x0015/0x07 by-time limit in minutes (bkv.md 7.2)
MAX_DURATION_MIN = 900
#: energy limit: u16 in Wh (bkv.md 7.2)
MAX_ENERGY_KWH = 0xFFFF / 1000
#: 0x0015/0x0B down ``charge_mode`` (bkv.md 7.6 / 11.2)
CARD_BY_TIME = 1
CARD_BY_POWER_TIERS = 3

#: commands with their own endpoints (start, stop, query); power-tier and fee-mode
#: starts would bypass the order layer; OTA concerns the gateway and goes through an
#: upgrade job (its answer is undocumented)
_EXCLUDED = {
    bkv.ChargeControl,
    bkv.SocketQuery,
    bkv.PowerTierControl,
    bkv.FeeModeControl,
    bkv.OtaUpgrade,
}

#: name -> message class of every command the generic endpoint accepts:
#: node_list_refresh (0x0005/0x08), node_add (0x0005/0x09), voice_window (0x0015/0x1B),
#: set_params (0x1000/0x1011), query_params (0x1000/0x1012)
GENERIC: dict[str, type[bkv.BkvMessage]] = {
    command_name(cls): cls
    for cls in bkv.MESSAGE_CLASSES
    if cls.direction is bkv.ChargeControl.direction
    and not bkv.is_server_reply(cls)
    and cls not in _EXCLUDED
}


def start_params(
    port: int, mode: str, duration_min: int | None, energy_kwh: float | None
) -> dict[str, Any]:
    """The 0x07 "on" parameters of a start: by time, by energy, or until full.

    The socket stops by itself when the battery is full (parameters 0x21/0x23), so
    "until full" is a start by time with the longest limit the sub-command allows.
    """
    if mode == "energy":
        return {"port": port, "charge_mode": BY_ENERGY, "duration_min": 0, "energy_kwh": energy_kwh}
    minutes = MAX_DURATION_MIN if mode == "full" else duration_min
    return {"port": port, "charge_mode": BY_TIME, "duration_min": minutes, "energy_kwh": 0.0}


def _address(device_id: str) -> tuple[str, int]:
    gateway_id, socket = split_device_id(device_id)
    if socket is None:
        raise EncodeError(
            f"{device_id!r} is not a BKV socket (<gateway_id>-<socket>)", field="device_id"
        )
    return gateway_id, socket


def _check_limits(params: dict[str, Any]) -> None:
    mode = params.get("charge_mode", BY_TIME)
    if mode not in (BY_TIME, BY_ENERGY):
        raise EncodeError("charge_mode is 1 (by time) or 0 (by energy)", field="charge_mode")
    minutes = params.get("duration_min", 0)
    energy = params.get("energy_kwh", 0.0)
    if mode == BY_TIME and not (isinstance(minutes, int) and 1 <= minutes <= MAX_DURATION_MIN):
        raise EncodeError(
            f"duration_min must be 1-{MAX_DURATION_MIN} for a BKV start by time",
            field="duration_min",
        )
    if mode == BY_ENERGY:
        if not (isinstance(energy, int | float) and 0 < energy <= MAX_ENERGY_KWH):
            raise EncodeError(
                f"energy_kwh must be above 0 and at most {MAX_ENERGY_KWH} for BKV",
                field="energy_kwh",
            )
        if not (isinstance(minutes, int) and 0 <= minutes <= MAX_DURATION_MIN):
            raise EncodeError(f"duration_min must be 0-{MAX_DURATION_MIN}", field="duration_min")


#: the upgrade job command (firmware.py): 0x0007 OTA to the gateway of the socket it is
#: queued under; params ``target``, ``ftp_ip``, ``ftp_port``, ``file_name``. The
#: gateway's answer is undocumented (bkv.md 14.7): done once written
OTA = "firmware_ota"


def build(device_id: str, name: str, params: dict[str, Any], seq: int) -> bkv.BkvMessage:
    """The message for a command; ``EncodeError`` when the parameters do not fit."""
    gateway_id, socket = _address(device_id)
    if name == OTA:
        return bkv.OtaUpgrade.from_fields({**params, "gateway_id": gateway_id, "seq": seq})
    if name == "start" and "card_business_no" in params:
        return _card_order(gateway_id, socket, params, seq)
    if name == "start":
        _check_limits(params)
        return bkv.ChargeControl(
            gateway_id,
            seq,
            socket=socket,
            port=params["port"],
            switch=1,
            charge_mode=params.get("charge_mode", BY_TIME),
            duration_min=params.get("duration_min", 0),
            energy_kwh=float(params.get("energy_kwh", 0.0)),
        )
    if name == "stop":  # switched off, the limits are ignored (bkv.md 7.2)
        return bkv.ChargeControl(
            gateway_id,
            seq,
            socket=socket,
            port=params["port"],
            switch=0,
            charge_mode=BY_TIME,
            duration_min=0,
            energy_kwh=0.0,
        )
    if name == "modify":
        raise EncodeError(
            "not supported by BKV: the protocol has no command to change a running limit",
            field="command",
        )
    if name == "query":
        return bkv.SocketQuery(gateway_id, seq, socket=socket)
    cls = GENERIC.get(name)
    if cls is None:
        raise EncodeError(f"unknown BKV command {name!r}", field="command")
    fields: dict[str, Any] = {"socket": socket, **params, "gateway_id": gateway_id, "seq": seq}
    if name == "node_list_refresh":
        fields.pop("socket")  # the node list names its sockets itself
    if issubclass(cls, bkv.TlvMessage):
        fields.update(bkv_seq=seq, bkv_gateway_id=gateway_id)
    return cls.from_fields(fields)


def _card_order(gateway_id: str, socket: int, params: dict[str, Any], seq: int) -> bkv.CardOrder:
    """The 0x0B down order for an accepted card swipe (bkv.md 7.6): by time
    (``duration_raw``) or by power tiers (``amount_cent`` and ``tiers``)."""
    mode = params["charge_mode"]
    fields: dict[str, Any] = {}
    if mode == CARD_BY_POWER_TIERS:
        fields["amount_cent"] = params["amount_cent"]
        fields["tiers"] = tuple(
            bkv.PowerTier(
                power_w=float(t["power_w"]),
                price_cent=t["price_cent"],
                duration_min=t["duration_min"],
            )
            for t in params["tiers"]
        )
    elif mode != CARD_BY_TIME:
        raise EncodeError("charge_mode is 1 (by time) or 3 (by power tiers)", field="charge_mode")
    return bkv.CardOrder(
        gateway_id,
        seq,
        socket=socket,
        port=params["port"],
        business_no=params["card_business_no"],
        switch=1,
        charge_mode=mode,
        duration_raw=params.get("duration_raw", 0),
        energy_kwh=0.0,
        **fields,
    )


def validate(device_id: str, name: str, params: dict[str, Any]) -> None:
    """Raise ``EncodeError`` (with the field) if the command cannot be sent."""
    try:
        bkv.encode(build(device_id, name, params, 1))
    except KeyError as exc:
        raise EncodeError(f"missing parameter {exc.args[0]}", field=str(exc.args[0])) from None


def reply_key(gateway_id: str, seq: int, command: int, key: int | None) -> tuple[Any, ...]:
    """(gateway id, seq, outer command, sub-command or BKV command id)."""
    return (gateway_id, seq, command, key)


def key_of(message: bkv.BkvMessage) -> tuple[Any, ...]:
    """The reply key a frame carries."""
    key = bkv.message_key(message)
    return reply_key(message.gateway_id, message.seq, message.wire_command, key)


def query_key(device_id: str) -> tuple[str, str]:
    return (device_id, "query")


def outcome(message: Message) -> Outcome:
    """Success, result code and its meaning from a device's reply (success: result 1)."""
    result = getattr(message, "result", None)
    fields = message.to_fields()
    if not isinstance(result, int):  # a state or status cluster answering a query
        return Outcome(True, None, None, fields)
    text = fields.get("result_text")
    return Outcome(result == 1, result, text if isinstance(text, str) else None, fields)


#: the seq is a u32 on the wire; the outbox stores correlations in an int4 column
MAX_SEQ = 0x7FFFFFFF


class BkvCommands:
    """The outbox's view of BKV: frames out, reply keys."""

    #: seq 0 marks frames a device sends on its own (bkv.md 3): never used
    max_correlation = MAX_SEQ

    def correlation_scope(self, device_id: str, params: dict[str, Any]) -> str:
        """The gateway: its sockets share the connection, and replies are matched by
        (gateway, seq, command)."""
        return _address(device_id)[0]

    def validate(self, device_id: str, name: str, params: dict[str, Any]) -> None:
        """``EncodeError`` (with the field) if the command cannot be sent to the socket
        ``device_id`` (``ports.CommandCheck``)."""
        validate(device_id, name, params)

    def encode_command(
        self, device_id: str, name: str, params: dict[str, Any], correlation: int
    ) -> tuple[bytes, Any]:
        message = build(device_id, name, params, correlation)
        if name == "query":  # answered by a state or a status cluster (query_key)
            return bkv.encode(message), query_key(device_id)
        reply = bkv.reply_for(message)
        if reply is None:  # OTA: its answer is undocumented, done once written
            return bkv.encode(message), None
        if reply.key != bkv.message_key(message):  # a card order is confirmed by 0x0F
            return bkv.encode(message), reply_key(
                message.gateway_id, message.seq, message.wire_command, reply.key
            )
        return bkv.encode(message), key_of(message)
