"""Which AP3000 message answers which: the reply rules of the protocol, in one table.

A reply carries the command code and the msg id of the message it answers (ap3000.md
3 and 7). Messages that are not a key of :data:`replies` expect no reply: reports such
as 0x06, 0x11, 0x17, 0x35, 0x41-0x44; 0x05; 0xE4 and 0xFE (the documents show none);
0x81, which the device answers by sending 0x20, 0x01 and 0x21 of its own; 0x3B, which
the server answers with a new 0x3A command rather than an echo.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Final

from .._base import Direction, Message
from ._messages import (
    Ap3000Message,
    CabinetStop,
    CabinetStopReply,
    CardParams,
    CardSwipe,
    CardSwipeReply,
    ChargeControl,
    ChargeControlReply,
    ClearStorage,
    ClearStorageReply,
    ClearSubDeviceUpgrades,
    ClearSubDeviceUpgradesReply,
    Heartbeat,
    HeartbeatReply,
    HostFirmwareReply,
    HostFirmwareRequest,
    HostFirmwareRequestReply,
    HostFirmwareUpgrade,
    HostLegacyFirmwarePacket,
    HostLegacyFirmwareReply,
    HostSetFirmwarePacket,
    HostSetFirmwareReply,
    HostTimeReply,
    HostTimeRequest,
    LegacyFirmwarePacket,
    LegacyFirmwareReply,
    LegacyHeartbeat,
    LegacyHeartbeatReply,
    Limits,
    Locate,
    LocateReply,
    ModifyChargeLimit,
    ModifyChargeLimitReply,
    MultiFunction,
    MultiFunctionReply,
    OrderConfirm,
    OrderConfirmReply,
    PlayVoice,
    PlayVoiceReply,
    PowerBoardFirmwarePacket,
    PowerBoardFirmwareReply,
    ReadCardParams,
    ReadEeprom,
    ReadEepromReply,
    ReadLimits,
    ReadRunningParams1,
    ReadRunningParams2,
    Reboot,
    RebootHost,
    RebootHostReply,
    RebootModem,
    RebootModemReply,
    RebootReply,
    Registration,
    RegistrationReply,
    ReservedFD,
    ReservedFDReply,
    RunningParams1,
    RunningParams2,
    SetCardParams,
    SetCardParamsReply,
    SetFskParams,
    SetFskParamsReply,
    SetLimits,
    SetLimitsReply,
    SetQrCode,
    SetQrCodeReply,
    SetRunningParams1,
    SetRunningParams1Reply,
    SetRunningParams2,
    SetRunningParams2Reply,
    SetRunningParams3,
    SetRunningParams3Reply,
    SetServerAddress,
    SetServerAddressReply,
    SetTcCardMode,
    SetTcCardModeReply,
    Settlement,
    SettlementReply,
    SetWorkMode,
    SetWorkModeReply,
    SubDeviceFirmwarePacket,
    SubDeviceFirmwareReply,
    TemporaryQrCode,
    TemporaryQrCodeReply,
    TimeReply,
    TimeRequest,
    WriteEeprom,
    WriteEepromReply,
)

_REPLIES: dict[type[Ap3000Message], type[Ap3000Message]] = {
    # the device asks, the server answers (section 8 and 10)
    LegacyHeartbeat: LegacyHeartbeatReply,  # 0x01, answer it or 0x21, never both
    CardSwipe: CardSwipeReply,  # 0x02
    Settlement: SettlementReply,  # 0x03, mandatory: resent until acknowledged
    OrderConfirm: OrderConfirmReply,  # 0x04
    HostTimeRequest: HostTimeReply,  # 0x12
    HostFirmwareRequest: HostFirmwareRequestReply,  # 0x15
    Registration: RegistrationReply,  # 0x20
    Heartbeat: HeartbeatReply,  # 0x21
    TimeRequest: TimeReply,  # 0x22
    # the server commands, the device (or host) answers (section 9 and 10)
    RebootHost: RebootHostReply,  # 0x31
    RebootModem: RebootModemReply,  # 0x32
    ClearSubDeviceUpgrades: ClearSubDeviceUpgradesReply,  # 0x33
    SetServerAddress: SetServerAddressReply,  # 0x34
    SetFskParams: SetFskParamsReply,  # 0x3A
    CabinetStop: CabinetStopReply,  # 0x72
    ChargeControl: ChargeControlReply,  # 0x82
    SetRunningParams1: SetRunningParams1Reply,  # 0x83
    SetRunningParams2: SetRunningParams2Reply,  # 0x84
    SetLimits: SetLimitsReply,  # 0x85
    SetCardParams: SetCardParamsReply,  # 0x86
    Reboot: RebootReply,  # 0x87, may be lost in the reboot
    ClearStorage: ClearStorageReply,  # 0x88
    PlayVoice: PlayVoiceReply,  # 0x89
    ModifyChargeLimit: ModifyChargeLimitReply,  # 0x8A
    ReadEeprom: ReadEepromReply,  # 0x8B
    WriteEeprom: WriteEepromReply,  # 0x8C
    SetWorkMode: SetWorkModeReply,  # 0x8D
    SetQrCode: SetQrCodeReply,  # 0x8E
    SetTcCardMode: SetTcCardModeReply,  # 0x8F
    ReadRunningParams1: RunningParams1,  # 0x90
    ReadRunningParams2: RunningParams2,  # 0x91
    ReadLimits: Limits,  # 0x92
    ReadCardParams: CardParams,  # 0x93
    TemporaryQrCode: TemporaryQrCodeReply,  # 0x95
    Locate: LocateReply,  # 0x96
    SetRunningParams3: SetRunningParams3Reply,  # 0x97
    MultiFunction: MultiFunctionReply,  # 0x98
    SubDeviceFirmwarePacket: SubDeviceFirmwareReply,  # 0xE0
    PowerBoardFirmwarePacket: PowerBoardFirmwareReply,  # 0xE1
    HostSetFirmwarePacket: HostSetFirmwareReply,  # 0xE2
    LegacyFirmwarePacket: LegacyFirmwareReply,  # 0xF8
    HostLegacyFirmwarePacket: HostLegacyFirmwareReply,  # 0xF9
    HostFirmwareUpgrade: HostFirmwareReply,  # 0xFA (trigger and packets)
    ReservedFD: ReservedFDReply,  # 0xFD
}

replies: Final[Mapping[type[Ap3000Message], type[Ap3000Message]]] = types.MappingProxyType(_REPLIES)
"""Request class -> the class of its reply, for every AP3000 message that is answered.

The reply has the request's command code and echoes its msg id (match it by
``(phy_id, command, msg_id)``). Read only.
"""

SERVER_REPLIES: Final[frozenset[type[Ap3000Message]]] = frozenset(
    reply for reply in _REPLIES.values() if reply.direction is Direction.DOWN
)
"""The messages the server sends only as the answer to a device's message (0x01,
0x02, 0x03, 0x04, 0x12, 0x15, 0x20, 0x21, 0x22 down); every other down message is a
command."""

_SERVER_REPLY_TYPES = tuple(SERVER_REPLIES)


def reply_for(message: Message | type[Message]) -> type[Ap3000Message] | None:
    """The class of the reply that answers ``message`` (a message or its class).

    None when the protocol expects no reply (see :data:`replies`). A subclass of a
    request class is answered like its base.

    >>> from chargeproto import ap3000
    >>> ap3000.reply_for(ap3000.Settlement).__name__
    'SettlementReply'
    >>> ap3000.reply_for(ap3000.QueryStatus) is None
    True
    """
    cls = message if isinstance(message, type) else type(message)
    for klass in cls.__mro__:
        reply = _REPLIES.get(klass)
        if reply is not None:
            return reply
    return None


def is_server_reply(message: Message | type[Message]) -> bool:
    """True when ``message`` (or its class) is one of :data:`SERVER_REPLIES`: the
    server's answer to a device's message, not a command to the device."""
    cls = message if isinstance(message, type) else type(message)
    return issubclass(cls, _SERVER_REPLY_TYPES)
