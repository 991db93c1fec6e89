"""The reply rules as protocol facts: which message answers which, and which messages
are the server's replies rather than commands."""

from __future__ import annotations

import pytest

import chargeproto
from chargeproto import ap3000, bkv

# --- AP3000 ---------------------------------------------------------------------------


def test_ap3000_reply_has_the_request_command_and_the_other_direction() -> None:
    """A reply echoes the command code (ap3000.md 3, 7)."""
    for request, reply in ap3000.replies.items():
        assert reply.command == request.command, (request, reply)
        assert reply.direction is not request.direction, (request, reply)
        assert request in ap3000.MESSAGE_CLASSES and reply in ap3000.MESSAGE_CLASSES


def test_ap3000_server_replies_are_the_answers_to_device_messages() -> None:
    assert {c.__name__ for c in ap3000.SERVER_REPLIES} == {
        "LegacyHeartbeatReply",
        "CardSwipeReply",
        "SettlementReply",
        "OrderConfirmReply",
        "HostTimeReply",
        "HostFirmwareRequestReply",
        "RegistrationReply",
        "HeartbeatReply",
        "TimeReply",
    }
    for cls in ap3000.MESSAGE_CLASSES:
        if cls.direction is chargeproto.Direction.DOWN:
            # a down message is a server reply or a command, never both
            assert ap3000.is_server_reply(cls) != (cls in ap3000.replies or _no_reply(cls))


def _no_reply(cls: type[ap3000.Ap3000Message]) -> bool:
    return cls in (ap3000.QueryStatus, ap3000.TriggerSelfUpgrade, ap3000.ReservedFE)


@pytest.mark.parametrize(
    ("request_cls", "reply_cls"),
    [
        (ap3000.Settlement, ap3000.SettlementReply),
        (ap3000.Heartbeat, ap3000.HeartbeatReply),
        (ap3000.ChargeControl, ap3000.ChargeControlReply),
        (ap3000.ReadLimits, ap3000.Limits),
        (ap3000.HostFirmwareUpgrade, ap3000.HostFirmwareReply),
        (ap3000.CabinetStop, ap3000.CabinetStopReply),
        (ap3000.QueryStatus, None),  # answered by 0x20/0x01/0x21 of the device's own
        (ap3000.TriggerSelfUpgrade, None),  # no reply shown (9.24)
        (ap3000.ReservedFE, None),  # no reply shown (9.25)
        (ap3000.FskParamsRequest, None),  # answered by a new 0x3A command (10.11)
        (ap3000.PowerHeartbeat, None),
        (ap3000.SettlementReply, None),
    ],
)
def test_ap3000_reply_for(request_cls: type[ap3000.Ap3000Message], reply_cls: object) -> None:
    assert ap3000.reply_for(request_cls) is reply_cls


def test_reply_for_takes_messages_and_subclasses() -> None:
    message = ap3000.decode("444e5910003b37ab0401002198080200000905ee02")
    assert ap3000.reply_for(message) is ap3000.HeartbeatReply
    assert ap3000.is_server_reply(ap3000.HeartbeatReply("04AB373B", 1, result=0))
    assert not ap3000.is_server_reply(message)

    class Custom(ap3000.Heartbeat):
        pass

    assert ap3000.reply_for(Custom) is ap3000.HeartbeatReply


def test_every_ap3000_down_command_but_the_documented_exceptions_is_answered() -> None:
    unanswered = {
        cls
        for cls in ap3000.MESSAGE_CLASSES
        if cls.direction is chargeproto.Direction.DOWN
        and not ap3000.is_server_reply(cls)
        and ap3000.reply_for(cls) is None
    }
    assert unanswered == {ap3000.QueryStatus, ap3000.TriggerSelfUpgrade, ap3000.ReservedFE}


def test_replies_are_read_only() -> None:
    with pytest.raises(TypeError):
        ap3000.replies[ap3000.Heartbeat] = ap3000.TimeReply  # type: ignore[index]
    with pytest.raises(TypeError):
        bkv.replies[bkv.Heartbeat] = bkv.CardEndAck  # type: ignore[index]


# --- BKV --------------------------------------------------------------------------------


def test_bkv_replies_go_the_other_way() -> None:
    for request, reply in bkv.replies.items():
        assert reply.direction is not request.direction, (request, reply)
        assert request in bkv.MESSAGE_CLASSES and reply in bkv.MESSAGE_CLASSES


def test_bkv_server_replies() -> None:
    assert {
        bkv.HeartbeatReply,
        bkv.CardOrder,
        bkv.CardEndAck,
        bkv.BalanceReply,
        bkv.StatusClusterAck,
        bkv.FeeModeEndAck,
        bkv.EventReportAck,
    } == bkv.SERVER_REPLIES


@pytest.mark.parametrize(
    ("request_cls", "reply_cls"),
    [
        (bkv.Heartbeat, bkv.HeartbeatReply),
        (bkv.CardSwipe, bkv.CardOrder),
        (bkv.CardOrder, bkv.CardOrderAck),  # a server reply that is answered itself
        (bkv.EndReport, bkv.CardEndAck),  # bkv.md 15
        (bkv.PowerTierEndReport, bkv.CardEndAck),
        (bkv.CardEndReport, bkv.CardEndAck),
        (bkv.SocketQuery, bkv.SocketState),
        (bkv.StatusCluster, bkv.StatusClusterAck),
        (bkv.QueryParams, bkv.ParamsReport),
        (bkv.OtaUpgrade, None),
        (bkv.PowerTierControl, None),
        (bkv.NodeDelete, None),
        (bkv.CardOrderAck, None),
        (bkv.TlvContainer, None),
    ],
)
def test_bkv_reply_for(request_cls: type[bkv.BkvMessage], reply_cls: object) -> None:
    assert bkv.reply_for(request_cls) is reply_cls


def test_bkv_socket_state_replies_of_either_sub_command_answer_a_query() -> None:
    reply = bkv.replies[bkv.SocketQuery]
    assert issubclass(bkv.SocketState1D, reply)
    assert (reply.command, reply.key) == (0x0015, 0x1C)


def test_bkv_card_order_is_confirmed_by_0x0f() -> None:
    ack = bkv.reply_for(bkv.CardOrder)
    assert ack is not None and (ack.command, ack.key) == (0x0015, 0x0F)
    assert bkv.is_server_reply(bkv.CardOrder)
