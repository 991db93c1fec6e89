"""What a driver may use of the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

import structlog

from chargegw.core import EventKind
from chargegw.domain.orders import Settled, SettlementReport
from chargegw.domain.ports import CardService, EngineContext, Handler, Inbound, M, SwipeResult
from chargegw.net.transport import REPLY, DeviceLink
from chargegw.quirks import QuirkBook
from chargegw.store.errors import is_unavailable
from chargegw.store.writer import BatchWriter, EventRow, GatewayRow
from chargeproto import Message, bkv

_R = TypeVar("_R")

log = structlog.get_logger("chargegw.drivers")


class DriverContext(EngineContext, Protocol):
    """The gateway as a driver sees it (the database, ``pool``, for the order lookups)."""

    writer: BatchWriter
    #: decides card swipes and balance queries
    cards: CardService
    #: the quirk profiles of the devices (docs/quirks.md)
    quirks: QuirkBook

    @property
    def owner(self) -> str:
        """This process's id in the session directory."""
        ...

    async def settle_order(
        self,
        report: SettlementReport,
        *,
        detail: dict[str, Any],
        while_connected: DeviceLink | None = None,
    ) -> Settled:
        """Commit a settlement (once: a resend changes nothing) with its price and event
        row, retrying while the database is unavailable and ``while_connected`` stays
        open."""
        ...

    async def order_progress(
        self,
        *,
        protocol: str,
        device_id: str,
        port: int,
        order_no: str,
        start_mode: str,
        sample: dict[str, Any],
    ) -> None:
        """A device reports an order charging: a sample, and reconciliation."""
        ...

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> datetime:
        """Server wall-clock time (UTC)."""
        ...

    def send(
        self,
        link: DeviceLink,
        frame: bytes,
        *,
        device_id: str | None,
        command: str,
        priority: int,
        message: Any = None,
        after_commit: bool = False,
    ) -> None:
        """Write ``frame`` to ``link`` (and to the audit log); with ``after_commit``
        only once every row queued so far is committed."""
        ...


class Hooks:
    """The handlers the engines registered with a driver, by message type
    (``ports.MessageHooks``)."""

    def __init__(self, protocol: str, family: type[Message]) -> None:
        self.protocol = protocol
        self._family = family
        self._handlers: dict[type[Message], list[Handler[Any]]] = {}

    def on(self, message_type: type[M], handler: Handler[M]) -> None:
        """Call ``handler`` with every ``message_type`` message the driver handled."""
        if not issubclass(message_type, self._family):
            raise TypeError(f"{message_type.__name__} is not a {self.protocol} message")
        self._handlers.setdefault(message_type, []).append(handler)

    def wants(self, message_type: type[Message]) -> bool:
        """True if a handler is registered for ``message_type``."""
        return message_type in self._handlers

    def tell(self, inbound: Inbound[Any]) -> None:
        """Hand ``inbound`` to its handlers; one that fails is logged, the others run."""
        for handler in self._handlers.get(type(inbound.message), ()):
            try:
                handler(inbound)
            except Exception:
                log.exception(
                    "engine handler failed",
                    message=type(inbound.message).__name__,
                    device_id=inbound.device_id,
                )


_LABELS: dict[type[Message], str] = {}
_BKV_LABELS: dict[tuple[int, int | None], str] = {}
_MAX_BKV_LABELS = 4096


def command_label(message: Message) -> str:
    """``0x21`` (AP3000), ``0x0000``, ``0x0015/0x07``, ``0x1000/0x1017`` (BKV)."""
    cached = _LABELS.get(type(message))
    if cached is not None:
        return cached
    if isinstance(message, bkv.BkvMessage):
        wire, key = message.wire_command, bkv.message_key(message)
        label = _BKV_LABELS.get((wire, key))
        if label is None:
            label = f"0x{wire:04x}"
            if key is not None:
                label += f"/0x{key:04x}" if wire == 0x1000 else f"/0x{key:02x}"
            if len(_BKV_LABELS) < _MAX_BKV_LABELS:  # unknown ids from a device: bounded
                _BKV_LABELS[(wire, key)] = label
        return label
    code = getattr(message, "unknown_command", None)
    if code is not None:
        return f"0x{code:02x}"
    label = _LABELS[type(message)] = f"0x{message.command:02x}"
    return label


def send_reply(
    ctx: DriverContext,
    link: DeviceLink,
    reply: Message,
    frame: bytes,
    device_id: str | None,
    *,
    after_commit: bool = False,
) -> None:
    """Send a driver's answer ``reply`` (encoded as ``frame``) with reply priority."""
    ctx.send(
        link,
        frame,
        device_id=device_id,
        command=command_label(reply),
        priority=REPLY,
        message=reply,
        after_commit=after_commit,
    )


def gateway_connected(
    ctx: DriverContext, link: DeviceLink, gateway_id: str, *, protocol: str, wall: datetime
) -> None:
    """Record ``gateway_id`` online on ``link`` (the connection's first word from it)."""
    ctx.writer.put_gateway(
        GatewayRow(
            gateway_id,
            protocol=protocol,
            online=True,
            connection_id=link.id,
            owner=ctx.owner,
            node=ctx.settings.node,
            remote_addr=link.remote,
            connected_at=wall,
            iccid=link.iccid,
        )
    )


def record_swipe(
    ctx: DriverContext, device_id: str, result: SwipeResult, detail: dict[str, Any]
) -> None:
    """The card-swipe event of a decision (with the order it opened, if any)."""
    if result.order_no is not None:
        detail = {**detail, "order_no": result.order_no}
    ctx.writer.put_event(
        EventRow(device_id, ctx.wall(), EventKind.CARD_SWIPE.value, result.reason, detail)
    )


async def retry_while_connected(
    attempt: Callable[[], Awaitable[_R]],
    link: DeviceLink | None,
    *,
    on_retry: Callable[[Exception], None] | None = None,
) -> _R:
    """``attempt()``; while the database is unavailable (``store.errors.is_unavailable``:
    away, read-only, full ...), retry with backoff (0.5 s doubling to 5 s) as long as
    ``link`` is open (the device resends later otherwise)."""
    delay = 0.5
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not is_unavailable(exc) or link is None or link.closed:
                raise
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
