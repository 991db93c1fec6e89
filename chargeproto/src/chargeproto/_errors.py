"""The one exception tree of chargeproto.

``ChargeProtoError`` is the root. ``DecodeError`` means "the peer sent bad bytes";
``EncodeError`` means "the caller asked for something the protocol cannot carry".
Every decode of hostile bytes raises a ``DecodeError`` subclass and nothing else.
"""

from __future__ import annotations


class ChargeProtoError(Exception):
    """Root of every exception chargeproto raises on purpose."""


class DecodeError(ChargeProtoError):
    """Bytes that do not form a valid frame or message.

    Attributes are machine readable: ``offset`` is the byte offset in the frame (or
    stream chunk) where the problem was found, ``expected`` and ``actual`` describe it
    when that makes sense, and ``kind`` is a short stable identifier for metrics.
    """

    kind = "decode"

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        expected: object = None,
        actual: object = None,
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.expected = expected
        self.actual = actual


class HexSyntaxError(DecodeError):
    """A hex string given to a helper or the CLI contains a non-hex character."""

    kind = "hex"


class HeaderError(DecodeError):
    """The frame does not start with the protocol's header bytes."""

    kind = "header"


class LengthError(DecodeError):
    """The length field disagrees with the frame, or exceeds the protocol maximum."""

    kind = "length"


class ChecksumError(DecodeError):
    """The checksum of an otherwise well-formed frame is wrong."""

    kind = "checksum"


class TruncatedError(DecodeError):
    """A frame or a required field ends before its declared size."""

    kind = "truncated"


class PayloadError(DecodeError):
    """A payload does not fit the layout of its command."""

    kind = "payload"


class TailError(DecodeError):
    """A BKV frame does not end with the ``fc ee`` tail."""

    kind = "tail"


class DirectionError(DecodeError):
    """A BKV frame's direction byte disagrees with its header."""

    kind = "direction"


class InnerLengthError(DecodeError):
    """A BKV inner length field disagrees with the payload."""

    kind = "inner_length"


class CommandMismatchError(DecodeError):
    """A frame carries a different command from the one the caller required."""

    kind = "command_mismatch"


class GarbageError(DecodeError):
    """Bytes in a stream that belong to no frame; they were skipped."""

    kind = "garbage"


class ProtocolDetectionError(DecodeError):
    """The first bytes of a connection match no supported protocol."""

    kind = "detection"


class EncodeError(ChargeProtoError):
    """A message cannot be encoded: a value out of range, a missing field, bad hex.

    ``field`` names the offending field when one is to blame.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RecordError(EncodeError):
    """A record (the JSON form of :func:`chargeproto.to_record`) that describes no
    message: not an object, an unknown protocol, name or command, a missing or
    mistyped frame-level field, fields that do not build the message.

    ``field`` names the offending key: a top-level key (``"phy_id"``, ``"command"``)
    or ``"fields.<name>"`` for a key inside ``fields``.
    """
