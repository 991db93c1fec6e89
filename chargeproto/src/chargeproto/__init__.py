"""chargeproto: sans-IO codecs for e-bike charging-pile protocols.

No sockets, no asyncio, no clocks: feed bytes in, get typed messages out; build
messages, get bytes back. See ``chargeproto.ap3000`` for the AP3000 ("DNY") family and
``chargeproto.bkv`` for BKV (``fc fe``/``fc ff``).

Importing the package is cheap: the two protocol packages, the protocol-detecting
:class:`StreamDecoder` and the record functions are loaded on first use (PEP 562
module ``__getattr__``), and each message's codec is generated the first time the
message is decoded or encoded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    RecordError,
    TailError,
    TruncatedError,
)
from ._events import Event, IccidReceived, KeepaliveReceived, MessageReceived, StreamError
from ._hex import parse_hex
from ._texts import shared_text

if TYPE_CHECKING:  # loaded on first use, see __getattr__
    from . import ap3000, bkv
    from ._dissector import dissector_lua
    from ._record import from_record, to_record
    from ._stream import StreamDecoder

__version__ = "0.1.0"

#: name -> (module, attribute or None for the module itself), imported on first access
_LAZY: dict[str, tuple[str, str | None]] = {
    "ap3000": (".ap3000", None),
    "bkv": (".bkv", None),
    "StreamDecoder": ("._stream", "StreamDecoder"),
    "dissector_lua": ("._dissector", "dissector_lua"),
    "from_record": ("._record", "from_record"),
    "to_record": ("._record", "to_record"),
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(target[0], __name__)
    value = module if target[1] is None else getattr(module, target[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "RecordError",
    "StreamDecoder",
    "StreamError",
    "TailError",
    "TruncatedError",
    "__version__",
    "ap3000",
    "bkv",
    "dissector_lua",
    "from_record",
    "parse_hex",
    "shared_text",
    "to_record",
]
