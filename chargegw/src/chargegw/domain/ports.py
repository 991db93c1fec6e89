"""What the drivers and the engines (params, firmware, billing) offer each other.

Drivers never import the engines, and the engines never import the drivers: both depend
on these Protocols and types, and ``chargegw.app`` (the composition root) wires them:

- the engines register, per message type, the handlers they need with each driver
  (:class:`MessageHooks`); a driver hands them every such message once it has answered
  it, as an :class:`Inbound`;
- the drivers' command codecs check the commands engines queue (:class:`CommandCheck`);
- the card registry decides the swipes the drivers ask about (:class:`CardService`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from chargegw import causes
from chargeproto import Message

if TYPE_CHECKING:
    import asyncpg

    from chargegw.config import Settings
    from chargegw.domain.outbox import Outbox
    from chargegw.net.sessions import SessionRegistry
    from chargegw.net.transport import DeviceLink

M = TypeVar("M", bound=Message)
_M_co = TypeVar("_M_co", bound=Message, covariant=True)


def command_name(message_type: type[Message]) -> str:
    """The command name of a message class in the outbox and the API: ``SetQrCode`` ->
    ``set_qr_code``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", message_type.__name__).lower()


class EngineContext(Protocol):
    """The gateway as an engine sees it."""

    settings: Settings
    sessions: SessionRegistry
    outbox: Outbox
    #: the database (None until the gateway started)
    pool: asyncpg.Pool | None

    def run(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` as a task the gateway owns (errors are logged, not lost)."""
        ...


# --- messages from the drivers ---------------------------------------------------------


def _frame_being_handled() -> int | None:
    cause = causes.current()
    return None if cause is None else cause.frame_id


@dataclasses.dataclass(frozen=True, slots=True)
class Inbound(Generic[_M_co]):
    """A device's message, as a driver hands it to the handlers registered for its type.

    A message that reports several devices (a BKV status cluster) is handed over once
    per device it reports, with that device's id.
    """

    link: DeviceLink
    message: _M_co
    #: the device the message concerns (None: a host or gateway speaking for itself)
    device_id: str | None
    #: who speaks: the device, else the host or gateway
    owner: str
    #: the outbox command the message answered (an AP3000 0x20 answers a 0x81 query)
    answered: int | None
    #: send an answer to the device (encoded by the driver, with reply priority)
    reply: Callable[[Message], None]
    #: the audit frame's id (``frames.id``): what the message changes, it causes (the
    #: gateway makes it the ambient cause while the frame is handled, see chargegw.causes)
    frame_id: int | None = dataclasses.field(default_factory=_frame_being_handled)


#: a handler runs inside the driver's callback: quick, no awaiting (``ctx.run`` the rest)
Handler = Callable[[Inbound[M]], None]


class MessageHooks(Protocol):
    """A driver as the engines register with it."""

    #: the protocol the driver speaks (``ap3000``, ``bkv``)
    protocol: str

    def on(self, message_type: type[M], handler: Handler[M]) -> None:
        """Call ``handler`` for every ``message_type`` message, after the driver's own
        handling (its reply is sent or scheduled)."""
        ...


# --- commands ----------------------------------------------------------------------------


class CommandCheck(Protocol):
    """A protocol's command encoding, as the engines check the commands they queue."""

    def validate(self, device_id: str, name: str, params: dict[str, Any]) -> None:
        """Raise ``chargeproto.EncodeError`` (naming the field) if the command cannot be
        built for ``device_id``."""
        ...


# --- cards ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SwipeResult:
    """The card registry's verdict on a swipe or balance query."""

    #: AP3000 account status (ap3000.md 11.6); 0: accepted
    account_status: int
    #: a short reason for the event log (``accepted``, ``insufficient_balance`` ...)
    reason: str
    balance_cent: int
    #: AP3000 rate mode announced for the device's plan (ap3000.md 11.7)
    rate_mode: int
    #: the order an accepted swipe opened (or, ``resent``, the one it opened before)
    order_no: str | None = None
    command_id: int | None = None
    #: the same swipe again: its order is on its way, nothing was decided anew
    resent: bool = False


#: ``start_params(order_no, port, rate_mode, balance_cent)``: the start command's
#: protocol parameters for an accepted swipe
StartParams = Callable[[str, int, int, int], dict[str, Any]]
#: ``start_params(card_order)``: the start command's parameters from what the device's
#: plan allows the card (``billing.bkv_card_order``: charge mode, minutes, tiers)
LimitedStartParams = Callable[[Mapping[str, Any]], dict[str, Any]]


class CardService(Protocol):
    """The card registry as the drivers ask it; each call is one transaction."""

    async def swipe(
        self,
        *,
        protocol: str,
        device_id: str,
        card_id: str,
        port: int | None,
        start_params: StartParams | None,
        what: str,
    ) -> SwipeResult:
        """Decide on a swipe on ``port`` (1-based; None: a balance query). Accepted: the
        order and its start command are stored (wake the outbox). ``what`` names the
        request in the error raised when there is no database."""
        ...

    async def swipe_with_limit(
        self,
        *,
        protocol: str,
        device_id: str,
        card_id: str,
        port: int,
        business_no: int,
        start_params: LimitedStartParams,
    ) -> SwipeResult:
        """Decide on a swipe whose start carries the limit the balance buys under the
        device's plan (BKV 0x0B). ``business_no``, allocated by the device with the swipe,
        identifies the session: a resend of an accepted swipe answers ``resent``."""
        ...
