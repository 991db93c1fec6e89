"""Which device lives behind which connection, and whether it is online.

Devices are bound to a connection by every identifier they send (physical id, gateway
id + socket, ICCID). When an identifier shows up on a newer connection, the newest
wins: the device moves, and an older connection left without devices is closed
(a pile reconnecting while its old socket is half-open, a SIM moved to another box).

Online/offline is decided from several signals: the connection closing, heartbeats
missing for ``missed_heartbeats`` intervals, and repeated command ACK timeouts.
Every transition is written to the device event log with its reason and time.
Time comes in as arguments (``now`` monotonic seconds, ``wall`` a datetime).

Binding a device also writes its session-directory row (through the batch writer, in
database time). The writer reports whether the bind took effect (:meth:`bind_results`):
a bind that lost to a newer one elsewhere lets the device go here, and a taken bind
remembers its database ``since``, against which binds of other processes are compared
(:meth:`superseded`) and with which the process re-asserts what it holds after an outage
(:meth:`held`). A device whose connection closed is forgotten (``on_gone``): memory does
not grow with every device id ever seen.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import structlog

from chargegw.core import EventKind
from chargegw.metrics import Metrics
from chargegw.store.writer import BatchWriter, BindResult, DeviceRow, EventRow

log = structlog.get_logger("chargegw.net.sessions")


class Link(Protocol):
    """What the session layer needs from a connection."""

    id: str
    remote: str
    iccid: str | None
    closed: bool

    def close(self, reason: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class Held:
    """A device this process holds on an open connection, with its directory ``since``."""

    device_id: str
    connection_id: str
    since: datetime
    online: bool
    protocol: str


@dataclasses.dataclass(slots=True)
class DeviceSession:
    device_id: str
    protocol: str
    gateway_id: str
    link: Link
    heartbeat_interval_s: float
    online: bool = False
    last_seen: float = 0.0
    last_heartbeat: float = 0.0
    ack_timeouts: int = 0
    #: when the device was bound to ``link`` (monotonic)
    bound_mono: float = 0.0
    #: the directory's ``since`` of that bind (database time); None until committed
    db_since: datetime | None = None
    #: when "online on this connection" was last put to the writer (monotonic)
    stamped: float = -1e18


class SessionRegistry:
    """In-memory directory of live devices; persists transitions through the writer."""

    def __init__(
        self,
        writer: BatchWriter,
        metrics: Metrics,
        *,
        missed_heartbeats: float,
        ack_timeouts_offline: int,
        node: str,
    ) -> None:
        self.writer = writer
        self.metrics = metrics
        self.missed_heartbeats = missed_heartbeats
        self.ack_timeouts_offline = ack_timeouts_offline
        self.node = node
        self.devices: dict[str, DeviceSession] = {}
        #: the devices bound to each connection (a tuple: mostly one device, and a set
        #: cost 200 bytes more per connection)
        self._by_link: dict[str, tuple[str, ...]] = {}
        self._links: dict[str, Link] = {}
        self._iccids: dict[str, Link] = {}
        self.on_offline: Callable[[str, str], None] = lambda device_id, reason: None
        #: called when a device comes online (its waiting commands can go out)
        self.on_online: Callable[[str], None] = lambda device_id: None
        #: called when a device is bound to a connection / released from it
        #: (the session directory in the database follows these)
        self.on_bound: Callable[[str, Link], None] = lambda device_id, link: None
        self.on_released: Callable[[str, Link], None] = lambda device_id, link: None
        #: called when the process lets go of a device entirely (its per-device state
        #: elsewhere can be dropped)
        self.on_gone: Callable[[str], None] = lambda device_id: None

    def device_ids(self, link: Link) -> tuple[str, ...]:
        """The devices currently bound to ``link``."""
        return self._by_link.get(link.id, ())

    def link_of(self, device_id: str) -> Link | None:
        """The open connection of a device, if it has one (commands go there)."""
        session = self.devices.get(device_id)
        if session is None or session.link.closed:
            return None
        return session.link

    # -- signals --

    def seen(
        self,
        link: Link,
        device_id: str,
        *,
        protocol: str,
        gateway_id: str,
        heartbeat_interval_s: float,
        heartbeat: bool,
        now: float,
        wall: datetime,
    ) -> DeviceSession:
        """A frame from ``device_id`` arrived on ``link``."""
        session = self.devices.get(device_id)
        if (
            session is not None
            and session.online
            and session.link is link
            and now - session.stamped < self.writer.refresh_s
            and session.gateway_id == gateway_id
        ):  # seen again, nothing new: only its timestamps move in the database
            session.last_seen = now
            if heartbeat:
                session.last_heartbeat = now
            self.writer.touch_device(device_id, wall, wall if heartbeat else None)
            return session
        if session is None:
            session = DeviceSession(device_id, protocol, gateway_id, link, heartbeat_interval_s)
            self.devices[device_id] = session
            self._attach(link, session)
        elif session.link is not link:
            self._rebind(session, link, wall)
        elif device_id not in self._by_link.get(link.id, ()):  # bound again after a release
            self._attach(link, session)
        session.gateway_id = gateway_id
        session.heartbeat_interval_s = heartbeat_interval_s
        session.last_seen = now
        if heartbeat or not session.online:
            session.last_heartbeat = now
        if not session.online:
            self._set_online(session, wall, "frame received")
        session.stamped = now
        self.writer.put_device(
            DeviceRow(
                device_id,
                protocol=protocol,
                gateway_id=gateway_id,
                online=True,
                connection_id=link.id,
                last_seen_at=wall,
                last_heartbeat_at=wall if heartbeat else None,
            )
        )
        return session

    def bind_results(self, results: list[BindResult]) -> None:
        """The directory rows of binds were written: remember the ``since`` of those that
        took effect; let go of devices whose bind lost to a newer one elsewhere."""
        for result in results:
            session = self.devices.get(result.device_id)
            if session is None or session.link.id != result.connection_id:
                continue  # bound elsewhere since, or gone
            if result.since is not None:
                session.db_since = result.since
            else:
                self._let_go(session, "a newer connection of the device holds it")

    def held(self) -> list[Held]:
        """Every device this process holds on an open connection with a committed bind."""
        return [
            Held(device_id, s.link.id, s.db_since, s.online, s.protocol)
            for device_id, s in self.devices.items()
            if s.db_since is not None and not s.link.closed
        ]

    def held_count(self) -> int:
        """How many devices :meth:`held` lists (without building the list)."""
        return sum(1 for s in self.devices.values() if s.db_since is not None and not s.link.closed)

    def bind_iccid(self, link: Link, iccid: str) -> None:
        """A SIM announced itself; an older connection with the same SIM is stale."""
        link.iccid = iccid
        other = self._iccids.get(iccid)
        self._iccids[iccid] = link
        if other is not None and other is not link and not other.closed:
            log.info("SIM reconnected, closing the old connection", old=other.id, new=link.id)
            other.close("superseded")

    def ack_timeout(self, device_id: str, wall: datetime) -> None:
        """A command to the device went unanswered."""
        session = self.devices.get(device_id)
        if session is None:
            return
        session.ack_timeouts += 1
        if session.online and session.ack_timeouts >= self.ack_timeouts_offline:
            self._set_offline(session, wall, "ack_timeouts")

    def ack_ok(self, device_id: str) -> None:
        """A command to the device was answered."""
        session = self.devices.get(device_id)
        if session is not None:
            session.ack_timeouts = 0

    def superseded(self, device_id: str, since: datetime) -> None:
        """The directory shows the device held by another process since ``since``
        (database time). If our bind is committed and not newer, the directory's choice
        stands (the newest bind wins, ties to the row's holder): let the device go here.
        A bind not committed yet is decided when it is written (:meth:`bind_results`).
        """
        session = self.devices.get(device_id)
        if session is None or session.db_since is None or session.db_since > since:
            return
        self._let_go(session, "another process holds a newer connection")

    def _let_go(self, session: DeviceSession, why: str) -> None:
        """Forget a device that is online elsewhere: no offline event. A connection left
        without devices is closed, as when the newer connection is in this process."""
        device_id = session.device_id
        del self.devices[device_id]
        link = session.link
        remaining = self._unbind(link, device_id)
        if session.online:
            self.metrics.devices_online.labels(protocol=session.protocol).dec()
        log.info("device moved to another connection", device_id=device_id, old=link.id, why=why)
        self.on_gone(device_id)
        if not remaining and not link.closed:
            link.close("superseded")

    def link_opened(self, link: Link) -> None:
        self._links[link.id] = link

    def link_closed(self, link: Link, reason: str, wall: datetime) -> None:
        """The connection is gone: its devices go offline with the reason, and are
        forgotten (a device that comes back starts a new session)."""
        self._links.pop(link.id, None)
        if link.iccid and self._iccids.get(link.iccid) is link:
            del self._iccids[link.iccid]
        for device_id in self._by_link.pop(link.id, ()):
            session = self.devices.get(device_id)
            if session is None or session.link is not link:
                continue
            self.on_released(device_id, link)
            if session.online:
                self._set_offline(session, wall, reason)
            del self.devices[device_id]
            self.on_gone(device_id)

    def sweep(self, now: float, wall: datetime) -> None:
        """Mark devices offline whose heartbeats stopped."""
        for session in self.devices.values():
            if not session.online:
                continue
            limit = session.heartbeat_interval_s * self.missed_heartbeats
            if now - session.last_heartbeat > limit:
                self._set_offline(session, wall, "heartbeat_timeout")

    # -- transitions --

    def _attach(self, link: Link, session: DeviceSession) -> None:
        session.bound_mono = time.monotonic()
        session.db_since = None
        bound = self._by_link.get(link.id, ())
        if session.device_id not in bound:
            self._by_link[link.id] = (*bound, session.device_id)
        self.on_bound(session.device_id, link)

    def _unbind(self, link: Link, device_id: str) -> tuple[str, ...]:
        """Take ``device_id`` off ``link``; the devices left on it."""
        bound = self._by_link.get(link.id)
        if bound is None:
            return ()
        remaining = tuple(d for d in bound if d != device_id)
        self._by_link[link.id] = remaining
        return remaining

    def _rebind(self, session: DeviceSession, link: Link, wall: datetime) -> None:
        old = session.link
        remaining = self._unbind(old, session.device_id)
        session.link = link
        self._attach(link, session)
        self.writer.put_event(
            EventRow(
                session.device_id,
                wall,
                EventKind.REBOUND.value,
                "newer connection",
                {"old_connection": old.id, "new_connection": link.id, "remote": link.remote},
            )
        )
        log.info(
            "device moved to a newer connection",
            device_id=session.device_id,
            old=old.id,
            new=link.id,
        )
        if not remaining and not old.closed:
            old.close("superseded")

    def _set_online(self, session: DeviceSession, wall: datetime, reason: str) -> None:
        session.online = True
        session.ack_timeouts = 0
        self.metrics.devices_online.labels(protocol=session.protocol).inc()
        self.writer.put_event(
            EventRow(
                session.device_id,
                wall,
                EventKind.ONLINE.value,
                reason,
                {"connection": session.link.id, "remote": session.link.remote, "node": self.node},
            )
        )
        log.info("device online", device_id=session.device_id, connection=session.link.id)
        self.on_online(session.device_id)

    def _set_offline(self, session: DeviceSession, wall: datetime, reason: str) -> None:
        session.online = False
        self.metrics.devices_online.labels(protocol=session.protocol).dec()
        self.writer.put_device(
            DeviceRow(
                session.device_id,
                protocol=session.protocol,
                online=False,
                offline_reason=reason,
                connection_id=session.link.id,
            )
        )
        self.writer.put_event(
            EventRow(
                session.device_id,
                wall,
                EventKind.OFFLINE.value,
                reason,
                {"connection": session.link.id},
            )
        )
        log.info("device offline", device_id=session.device_id, reason=reason)
        self.on_offline(session.device_id, reason)
