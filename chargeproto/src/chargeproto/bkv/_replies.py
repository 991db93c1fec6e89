"""Which BKV message answers which: the reply rules of the protocol, in one table.

A reply echoes the ``seq`` of the frame it answers; match it by ``(gateway_id, seq,
outer command, sub-command or BKV command id)`` (bkv.md 3). The reply class's
``command`` and ``key`` give the last two; they differ from the request's for the
socket state (0x1D answered by 0x1C), the card order (0x0B confirmed by 0x0F) and the
end reports 0x02 and 0x18 (acknowledged with the 0x0C form).

Messages that are not a key of :data:`replies` expect no reply: the guide shows none
for 0x0015/0x17, 0x0007 OTA and the unconfirmed node deletion, and nothing answers
the socket's own replies. Two entries are not in the guide's examples: 0x0015/0x02
and 0x18 end reports are acknowledged with the 0x0C form (:class:`CardEndAck`), which
real gateways accept for 0x02 (bkv.md 15) and which is assumed for 0x18; the answer
to 0x1000/0x1007 is assumed to be the library's 0x1007 up class.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Final

from .._base import Direction, Message
from ._messages import (
    BalanceQuery,
    BalanceReply,
    BkvMessage,
    CardEndAck,
    CardEndReport,
    CardOrder,
    CardOrderAck,
    CardSwipe,
    ChargeControl,
    ChargeControlReply,
    EndReport,
    Heartbeat,
    HeartbeatReply,
    NodeAdd,
    NodeAddReply,
    NodeListRefresh,
    NodeListRefreshReply,
    PowerTierEndReport,
    SocketQuery,
    SocketState,
    VoiceWindow,
    VoiceWindowReply,
)
from ._tlv import (
    EventReport,
    EventReportAck,
    FeeModeControl,
    FeeModeControlReply,
    FeeModeEndAck,
    FeeModeEndReport,
    ParamsReport,
    QueryParams,
    SetParams,
    SetParamsReply,
    StatusCluster,
    StatusClusterAck,
)

_REPLIES: dict[type[BkvMessage], type[BkvMessage]] = {
    # the device reports or asks, the server answers
    Heartbeat: HeartbeatReply,  # 0x0000, with the server time (5)
    CardSwipe: CardOrder,  # 0x0015/0x0B up -> 0x0B down, the order (7.6)
    CardEndReport: CardEndAck,  # 0x0015/0x0C (7.6)
    EndReport: CardEndAck,  # 0x0015/0x02: the guide omits it; 0x0C form works (15)
    PowerTierEndReport: CardEndAck,  # 0x0015/0x18: not shown; as 0x02 (assumption)
    BalanceQuery: BalanceReply,  # 0x0015/0x1A (7.7)
    StatusCluster: StatusClusterAck,  # 0x1000/0x1017 (9.4)
    FeeModeEndReport: FeeModeEndAck,  # 0x1000/0x1004 (9.6)
    EventReport: EventReportAck,  # 0x1000/0x1010 (9.8)
    # the server commands, the gateway or socket answers
    NodeListRefresh: NodeListRefreshReply,  # 0x0005/0x08 (6.1)
    NodeAdd: NodeAddReply,  # 0x0005/0x09 (6.2)
    SocketQuery: SocketState,  # 0x0015/0x1D -> 0x1C (or 0x1D: SocketState1D) (7.1, B2)
    ChargeControl: ChargeControlReply,  # 0x0015/0x07 (7.2)
    CardOrder: CardOrderAck,  # 0x0015/0x0B down -> 0x0F, same seq (7.6)
    VoiceWindow: VoiceWindowReply,  # 0x0015/0x1B (7.8)
    FeeModeControl: FeeModeControlReply,  # 0x1000/0x1007: not shown (assumption, 9.5)
    SetParams: SetParamsReply,  # 0x1000/0x1011 (9.7)
    QueryParams: ParamsReport,  # 0x1000/0x1012 (9.7)
}

replies: Final[Mapping[type[BkvMessage], type[BkvMessage]]] = types.MappingProxyType(_REPLIES)
"""Request class -> the class of its reply, for every BKV message that is answered.

``SocketQuery`` is answered by :class:`SocketState` or its subclass
:class:`SocketState1D` (the same reply with sub-command 0x1D); real gateways may
answer it with an unsolicited :class:`StatusCluster` instead (bkv.md 15). Read only.
"""

SERVER_REPLIES: Final[frozenset[type[BkvMessage]]] = frozenset(
    reply for reply in _REPLIES.values() if reply.direction is Direction.DOWN
)
"""The messages the server sends as the answer to a gateway's or socket's message.

:class:`CardOrder` is one of them (it answers a card swipe) and is itself answered by
the socket's :class:`CardOrderAck`: a simulator must still act on it."""

_SERVER_REPLY_TYPES = tuple(SERVER_REPLIES)


def reply_for(message: Message | type[Message]) -> type[BkvMessage] | None:
    """The class of the reply that answers ``message`` (a message or its class).

    None when the protocol expects no reply (see :data:`replies`). A subclass of a
    request class is answered like its base.

    >>> from chargeproto import bkv
    >>> bkv.reply_for(bkv.CardSwipe).__name__
    'CardOrder'
    >>> bkv.reply_for(bkv.OtaUpgrade) is None
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
    server's answer to a gateway's or socket's message."""
    cls = message if isinstance(message, type) else type(message)
    return issubclass(cls, _SERVER_REPLY_TYPES)
