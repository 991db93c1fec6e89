"""chargeproto: sans-IO codecs for e-bike charging-pile protocols.

No sockets, no asyncio, no clocks: feed bytes in, get typed messages out; build
messages, get bytes back. See ``chargeproto.ap3000`` for the AP3000 ("DNY") family and
``chargeproto.bkv`` for BKV (``fc fe``/``fc ff``).
"""

from . import ap3000, bkv
from ._base import ABSENT, Absent, Direction, Item, Message
from ._errors import (
    ChargeProtoError,
    ChecksumError,
    CommandMismatchError,
    DecodeError,
    DirectionError,
    EncodeError,
    GarbageError,
    HeaderError,
    HexSyntaxError,
    InnerLengthError,
    LengthError,
    PayloadError,
    ProtocolDetectionError,
    TailError,
    TruncatedError,
)
from ._events import Event, IccidReceived, KeepaliveReceived, MessageReceived, StreamError
from ._hex import parse_hex
from ._stream import StreamDecoder

__version__ = "0.1.0"

__all__ = [
    "ABSENT",
    "Absent",
    "ChargeProtoError",
    "ChecksumError",
    "CommandMismatchError",
    "DecodeError",
    "Direction",
    "DirectionError",
    "EncodeError",
    "Event",
    "GarbageError",
    "HeaderError",
    "HexSyntaxError",
    "IccidReceived",
    "InnerLengthError",
    "Item",
    "KeepaliveReceived",
    "LengthError",
    "Message",
    "MessageReceived",
    "PayloadError",
    "ProtocolDetectionError",
    "StreamDecoder",
    "StreamError",
    "TailError",
    "TruncatedError",
    "__version__",
    "ap3000",
    "bkv",
    "parse_hex",
]
