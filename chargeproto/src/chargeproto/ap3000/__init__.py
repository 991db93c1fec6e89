"""The AP3000 ("DNY") protocol: frames, messages, stream decoder and helpers.

>>> from chargeproto import ap3000
>>> msg = ap3000.decode(bytes.fromhex("444e5910003b37ab0401002198080200000905ee02"))
>>> msg.phy_id, msg.voltage_v, [p.status for p in msg.ports]
('04AB373B', 220.0, [0, 0])
"""

from ._codec import decode, decode_checked, encode, message_class
from ._firmware import (
    CHECK_MAGIC,
    PACKET_SIZE,
    CheckPacket,
    UpgradeProgress,
    build_check_packet,
    image_checksum,
    parse_check_packet,
    split_image,
    verify_replies,
)
from ._frame import DEFAULT_MAX_FRAME, HEADER, build_frame, check_frame, checksum
from ._messages import *  # noqa: F403 - the message classes are the public API
from ._messages import REGISTRY, Ap3000Message, EmptyMessage, ResultReply, UnknownMessage
from ._order import (
    OrderNumber,
    card_order_id,
    check_verification_code,
    code_order_id,
    parse_order_id,
    verification_code,
)
from ._phy_id import PhysicalId
from ._stream import Ap3000StreamDecoder

MESSAGE_CLASSES = tuple(sorted(set(REGISTRY.values()), key=lambda c: (c.command, c.direction)))

__all__ = [
    "CHECK_MAGIC",
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "MESSAGE_CLASSES",
    "PACKET_SIZE",
    "REGISTRY",
    "Ap3000Message",
    "Ap3000StreamDecoder",
    "CheckPacket",
    "EmptyMessage",
    "OrderNumber",
    "PhysicalId",
    "ResultReply",
    "UnknownMessage",
    "UpgradeProgress",
    "build_check_packet",
    "build_frame",
    "card_order_id",
    "check_frame",
    "check_verification_code",
    "checksum",
    "code_order_id",
    "decode",
    "decode_checked",
    "encode",
    "image_checksum",
    "message_class",
    "parse_check_packet",
    "parse_order_id",
    "split_image",
    "verification_code",
    "verify_replies",
] + [cls.__name__ for cls in MESSAGE_CLASSES]
