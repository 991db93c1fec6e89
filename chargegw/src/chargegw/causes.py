"""What caused a change of state: a frame, an API call, a timer, a fault or the system.

Every change of a port's state, an order's or a command's status and a device's online
state records its cause (docs/events.md, "Causes"):

=========  ===============================================  =========================
kind       ``ref``                                          ``frame_id``
=========  ===============================================  =========================
frame      None                                             the audit frame's id
api        the call's ``X-Request-Id`` (``call_audit``)     None
timer      ``ack_timeout``, ``offline_sweep`` ...           None
fault      ``connection_lost``, ``cannot_encode`` ...       None
system     ``shutdown``, ``restore_recovery`` ...           None
=========  ===============================================  =========================

The cause of what the code is doing now is *ambient*: :func:`using` sets it for a block
(the gateway around a frame's handling, the API around a call, a timer around its
round), and the tasks started inside the block inherit it (``contextvars``), so a
settlement committed by a task a frame started is caused by that frame. Whoever writes a
change reads it with :func:`current` (the batch writer for port and device-event rows,
``store.causes.apply`` for a transaction) unless it is given a cause explicitly. A task
that outlives the block it was started in (a delivery worker) sets its own causes.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Iterator
from typing import NamedTuple


class CauseKind(str, enum.Enum):
    FRAME = "frame"
    API = "api"
    TIMER = "timer"
    FAULT = "fault"
    SYSTEM = "system"


class Cause(NamedTuple):
    """A change's cause, in the order of the rows' ``cause_kind``, ``cause_ref``,
    ``cause_frame_id`` columns (a NamedTuple: one small tuple per frame)."""

    kind: str
    ref: str | None = None
    frame_id: int | None = None

    @classmethod
    def frame(cls, frame_id: int | None) -> Cause | None:
        """A frame's cause (None if the frame has no id: nothing to point at)."""
        return None if frame_id is None else cls(CauseKind.FRAME.value, None, frame_id)

    @classmethod
    def api(cls, request_id: str) -> Cause:
        return cls(CauseKind.API.value, request_id)

    @classmethod
    def timer(cls, name: str) -> Cause:
        return cls(CauseKind.TIMER.value, name)

    @classmethod
    def fault(cls, name: str) -> Cause:
        return cls(CauseKind.FAULT.value, name)

    @classmethod
    def system(cls, name: str) -> Cause:
        return cls(CauseKind.SYSTEM.value, name)


#: names of the non-frame causes the gateway records (``cause_ref``)
ACK_TIMEOUT = "ack_timeout"
OFFLINE_SWEEP = "offline_sweep"
COMMAND_EXPIRED = "command_expired"
CONNECTION_LOST = "connection_lost"
RESTORE_RECOVERY = "restore_recovery"
RESTART_RECOVERY = "restart_recovery"

#: a connection closed for one of these reasons was closed by the gateway on purpose
#: (the cause names the reason); any other close is a lost connection
_CLOSED_BY_TIMER = frozenset({"idle_timeout", "identify_timeout"})
_CLOSED_BY_SYSTEM = frozenset(
    {"shutdown", "drain", "rebalance", "superseded", "banned", "unregistered", "garbage"}
)

_CURRENT: contextvars.ContextVar[Cause | None] = contextvars.ContextVar(
    "chargegw_cause", default=None
)


def current() -> Cause | None:
    """The ambient cause (None: nothing known)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(cause: Cause | None) -> Iterator[None]:
    """Make ``cause`` the ambient cause inside the block (None: no cause)."""
    token = _CURRENT.set(cause)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def enter(cause: Cause | None) -> contextvars.Token[Cause | None]:
    """Set the ambient cause without a block; undo with :func:`leave`."""
    return _CURRENT.set(cause)


_FRAME = CauseKind.FRAME.value
_new_tuple = tuple.__new__


def enter_frame(frame_id: int | None) -> contextvars.Token[Cause | None]:
    """:func:`enter` the cause of the frame ``frame_id`` (None: no cause). The per-frame
    path: one tuple, built without ``Cause.__new__`` (a third of the cost)."""
    cause = None if frame_id is None else _new_tuple(Cause, (_FRAME, None, frame_id))
    return _CURRENT.set(cause)


def leave(token: contextvars.Token[Cause | None]) -> None:
    _CURRENT.reset(token)


def of_close(reason: str) -> Cause:
    """The cause of what a connection's close changes (its devices going offline)."""
    if reason in _CLOSED_BY_TIMER:
        return Cause.timer(reason)
    if reason in _CLOSED_BY_SYSTEM:
        return Cause.system(reason)
    return Cause.fault(CONNECTION_LOST)
