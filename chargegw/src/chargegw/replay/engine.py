"""Feed a capture's device side to a gateway and collect what it answers.

One TCP connection per capture connection, its ``in`` frames in order. The connections
of one device (a pile that reconnected) run one after the other, in the order of the
capture; different devices run concurrently. After each device frame the replay waits
(at most ``reply_timeout_s``) for the reply the protocol expects for it when the capture
recorded one, so a pile's conversation keeps its order even as fast as possible; with a
``speed`` each frame also waits for its original time divided by the speed. After a
connection's last frame the replay waits until the gateway has been silent for
``quiet_s``, then closes the connection.

By default the gateway is a fresh in-process :class:`chargegw.app.Gateway` on a scratch
database (``chargegw_replay_<random>``, created on the given server and dropped at the
end); with ``target`` it is a running gateway, which is refused when it may serve real
piles (:func:`live_refusal`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib
import ipaddress
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from chargegw.capture import Capture, CaptureFrame, LineProblem
from chargegw.config import Settings, load_settings
from chargegw.replay import rules
from chargegw.replay.compare import (
    Received,
    compare_connection,
    compare_state,
    recorded_replies,
)
from chargegw.replay.frames import (
    Decoded,
    ReplyKey,
    check,
    expected_reply_key,
    frame_protocol,
    is_server_reply,
    reply_key,
    usable_bytes,
)
from chargegw.replay.report import ConnectionResult, ReplayReport
from chargeproto import (
    DecodeError,
    Event,
    IccidReceived,
    KeepaliveReceived,
    MessageReceived,
    StreamDecoder,
    StreamError,
)

#: seconds to wait for the reply a device frame expects
REPLY_TIMEOUT_S = 2.0
#: seconds of silence that end a connection after its last frame
QUIET_S = 0.3
#: unframed items a device sends that are not frames
_UNFRAMED = frozenset({"iccid", "link"})
#: what the replay lifts on its scratch gateway: limits that protect a production
#: gateway from floods and strangers would otherwise throttle or refuse a fast replay
SCRATCH_OVERRIDES: dict[str, Any] = {
    "device_host": "127.0.0.1",
    "device_port": 0,
    "workers": 1,
    "frame_rate_per_connection": 0.0,
    "frame_rate_per_process": 0.0,
    "flap_max_connects": 0,
    "accept_rate": 1_000_000.0,
    "device_allowed_networks": "",
    "device_max_unidentified_per_source": 0,
    "device_registry_mode": "off",
}


class ReplayError(Exception):
    """The replay cannot run at all (the gateway or database cannot be reached, the
    target is refused); the message says why."""


def capture_devices(frames: Iterable[CaptureFrame]) -> set[str]:
    """The device ids a capture's frames name, with the gateway of each BKV socket."""
    out: set[str] = set()
    for frame in frames:
        if frame.device_id:
            out.add(frame.device_id)
            if frame.protocol == "bkv" and "-" in frame.device_id:
                out.add(frame.device_id.split("-", 1)[0])
    return out


def chains(capture: Capture) -> list[list[str]]:
    """The capture's connections grouped by device: connections sharing a device, in
    file order, form one chain (replayed one after the other)."""
    connections = capture.connections()
    parent = {name: name for name in connections}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    owner: dict[str, str] = {}
    for name, frames in connections.items():
        for device in capture_devices(frames):
            if device in owner:
                parent[root(name)] = root(owner[device])
            else:
                owner[device] = name
    grouped: dict[str, list[str]] = {}
    for name in connections:
        grouped.setdefault(root(name), []).append(name)
    return list(grouped.values())


def feedable(frame: CaptureFrame, seed: str = "") -> bytes | LineProblem:
    """The bytes to send for a device frame, or why it cannot be replayed. A frame the
    gateway recorded as bad (``error``) is sent as recorded: replaying it tests how the
    gateway handles such bytes. One recorded as good that is not a complete frame (the
    capture was cut or edited) is skipped. ``seed`` picks the stand-in for masked
    bytes (:func:`chargegw.replay.frames.stand_in`)."""
    raw = usable_bytes(frame.hex, seed)
    if frame.error is not None or (frame.command or "") in _UNFRAMED:
        return raw
    if not raw:
        return LineProblem(frame.line, "empty device frame, not replayed")
    if frame_protocol(raw) is None and frame.protocol is not None:
        return LineProblem(frame.line, f"not a {frame.protocol} frame, not replayed")
    try:
        check(raw)
    except DecodeError as exc:
        return LineProblem(frame.line, f"device frame not replayed: {exc}")
    return raw


class _Link:
    """One replayed connection: its socket, and what the gateway sent on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received: list[Received] = []
        self.seen: collections.Counter[ReplyKey] = collections.Counter()
        self.changed = asyncio.Event()
        self.closed = False
        self.after_line = 0

    async def read(self) -> None:
        decoder = StreamDecoder("down")
        try:
            while chunk := await self.reader.read(65536):
                now = datetime.now(UTC)
                for event in decoder.feed(chunk):
                    self._add(event, now)
                self.changed.set()
        except OSError:
            pass
        finally:
            self.closed = True
            self.changed.set()

    def _add(self, event: Event, now: datetime) -> None:
        if isinstance(event, MessageReceived):
            self.received.append(Received(event.raw, now, self.after_line))
            message = Decoded.of(event.raw, "down").message
            if message is not None and is_server_reply(message):
                self.seen[reply_key(message)] += 1
        elif isinstance(event, IccidReceived | KeepaliveReceived):
            self.received.append(Received(event.raw, now, self.after_line, "unframed bytes"))
        elif isinstance(event, StreamError):
            self.received.append(Received(event.raw, now, self.after_line, str(event.error)))

    async def until(self, key: ReplyKey, count: int, timeout: float) -> None:
        """Until ``count`` replies with ``key`` arrived, the link closed, or timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.changed.clear()
            if self.seen[key] >= count or self.closed:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def quiet(self, quiet_s: float, limit_s: float) -> None:
        """Until the gateway sent nothing for ``quiet_s`` (at most ``limit_s``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while not self.closed and loop.time() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), quiet_s)
            except TimeoutError:
                return


class _Feeder:
    """Feeds the connections of a capture to ``host:port``."""

    def __init__(
        self,
        capture: Capture,
        host: str,
        port: int,
        *,
        speed: float | None,
        reply_timeout_s: float,
        quiet_s: float,
    ) -> None:
        self.capture = capture
        self.host = host
        self.port = port
        self.speed = speed
        self.reply_timeout_s = reply_timeout_s
        self.quiet_s = quiet_s
        self.connections = capture.connections()
        self.results: dict[str, ConnectionResult] = {}
        self.received: dict[str, list[Received]] = {}
        self.first_at = min(
            (frame.at for frame in capture.frames if frame.direction == "in"),
            default=datetime.now(UTC),
        )
        self.started = 0.0

    async def run(self) -> None:
        self.started = asyncio.get_running_loop().time()
        async with asyncio.TaskGroup() as group:
            for chain in chains(self.capture):
                group.create_task(self._chain(chain))

    async def _chain(self, names: Sequence[str]) -> None:
        for name in names:
            await self._connection(name, self.connections[name])

    async def _due(self, frame: CaptureFrame) -> None:
        if self.speed is None:
            return
        loop = asyncio.get_running_loop()
        due = self.started + (frame.at - self.first_at).total_seconds() / self.speed
        if due > loop.time():
            await asyncio.sleep(due - loop.time())

    async def _connection(self, name: str, frames: Sequence[CaptureFrame]) -> None:
        result = self.results[name] = ConnectionResult(
            name, sorted(capture_devices(frames) - _gateways_of(frames))
        )
        to_feed: list[tuple[CaptureFrame, bytes]] = []
        seed = min(capture_devices(frames), default=name)
        for frame in frames:
            if frame.direction != "in":
                continue
            raw = feedable(frame, seed)
            if isinstance(raw, LineProblem):
                result.skipped.append(raw)
            else:
                to_feed.append((frame, raw))
        recorded = collections.Counter(reply.key for reply in recorded_replies(frames)[0])
        if not to_feed:
            self.received[name] = []
            return
        await self._due(to_feed[0][0])
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise ReplayError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        link = _Link(reader, writer)
        awaited: collections.Counter[ReplyKey] = collections.Counter()
        async with asyncio.TaskGroup() as group:
            group.create_task(link.read())
            try:
                for index, (frame, raw) in enumerate(to_feed):
                    await self._due(frame)
                    if link.closed:
                        for left, _ in to_feed[index:]:
                            result.skipped.append(
                                LineProblem(left.line, "not fed: the gateway closed the connection")
                            )
                        break
                    link.after_line = frame.line
                    writer.write(raw)
                    with contextlib.suppress(OSError):
                        await writer.drain()
                    result.fed += 1
                    message = Decoded.of(raw, "up").message
                    key = expected_reply_key(message) if message is not None else None
                    if key is not None and recorded[key] > awaited[key]:
                        awaited[key] += 1
                        await link.until(key, awaited[key], self.reply_timeout_s)
                await link.quiet(self.quiet_s, self.reply_timeout_s + self.quiet_s)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        self.received[name] = link.received


def _gateways_of(frames: Iterable[CaptureFrame]) -> set[str]:
    """BKV gateway ids implied by socket ids (listed with their sockets, not alone)."""
    devices = {frame.device_id for frame in frames if frame.device_id}
    return {
        device.split("-", 1)[0]
        for device in devices
        if "-" in device and device.split("-", 1)[0] not in devices
    }


def _mode(speed: float | None) -> str:
    if speed is None:
        return "fast"
    return "realtime" if speed == 1 else f"speed {speed:g}"


async def feed(
    capture: Capture,
    host: str,
    port: int,
    *,
    speed: float | None = None,
    reply_timeout_s: float = REPLY_TIMEOUT_S,
    quiet_s: float = QUIET_S,
    clock_tolerance_s: float = rules.CLOCK_TOLERANCE_S,
) -> list[ConnectionResult]:
    """Feed ``capture``'s device side to ``host:port`` and compare the replies (no
    state); one result per connection, in the order of the capture."""
    feeder = _Feeder(
        capture, host, port, speed=speed, reply_timeout_s=reply_timeout_s, quiet_s=quiet_s
    )
    try:
        await feeder.run()
    except* ReplayError as group:
        raise group.exceptions[0] from None
    results = []
    for name, frames in feeder.connections.items():
        result = feeder.results[name]
        compare_connection(
            result, frames, feeder.received[name], clock_tolerance_s=clock_tolerance_s
        )
        results.append(result)
    return results


# --- the scratch gateway ----------------------------------------------------------------


def _with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ReplayError("the DSN must be a postgresql:// URL to create a scratch database")
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment)
    )


@contextlib.asynccontextmanager
async def scratch_database(server_dsn: str) -> AsyncIterator[str]:
    """A new database ``chargegw_replay_<random>`` on the server of ``server_dsn`` (its
    DSN), dropped at the end."""
    name = f"chargegw_replay_{secrets.token_hex(6)}"
    dsn = _with_database(server_dsn, name)
    try:
        admin = await asyncpg.connect(server_dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ReplayError(f"cannot connect to the database server: {exc}") from exc
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.PostgresError as exc:
        raise ReplayError(f"cannot create the scratch database {name}: {exc}") from exc
    finally:
        await admin.close()
    try:
        yield dsn
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _state(pool: asyncpg.Pool, devices: set[str], since: datetime) -> dict[str, Any]:
    """The state of ``devices`` as ``chargegw frames export`` writes it in a capture (the
    same function, so the two are comparable)."""
    # imported by name: the export is an optional part of an installation (ImportError
    # is reported as "state not compared")
    export_frames = importlib.import_module("chargegw.ops.frames_export").export_frames
    async with pool.acquire() as conn:
        _, state = await export_frames(
            conn,
            device_ids=sorted(devices),
            since=since,
            until=datetime.now(UTC) + timedelta(seconds=1),
        )
    return dict(state)


async def replay(
    capture: Capture,
    *,
    source: str | None = None,
    dsn: str | None = None,
    data_dir: str | Path | None = None,
    settings: Settings | None = None,
    target: tuple[str, int] | None = None,
    speed: float | None = None,
    reply_timeout_s: float = REPLY_TIMEOUT_S,
    quiet_s: float = QUIET_S,
    clock_tolerance_s: float = rules.CLOCK_TOLERANCE_S,
) -> ReplayReport:
    """Replay ``capture`` and compare; see the module docstring.

    ``dsn`` names a PostgreSQL server on which a scratch database is created (without
    it the embedded server in ``data_dir``); ``settings`` are the gateway's (the replay
    overrides :data:`SCRATCH_OVERRIDES` and the DSN); ``target`` feeds a running gateway
    instead (the caller checks :func:`live_refusal` first). ``speed`` None is as fast as
    possible, 1 the original timing. ``source`` names the capture in the report. Frames
    built in memory (line 0) are numbered in order, in ``capture`` itself."""
    if any(frame.line == 0 for frame in capture.frames):
        # built in memory: lines identify the frames in the report and the baseline
        capture.frames = [
            dataclasses.replace(frame, line=number)
            for number, frame in enumerate(capture.frames, start=1)
        ]
    options: dict[str, Any] = {
        "speed": speed,
        "reply_timeout_s": reply_timeout_s,
        "quiet_s": quiet_s,
        "clock_tolerance_s": clock_tolerance_s,
    }
    report = ReplayReport(source, _mode(speed), None, [], list(capture.problems))
    if target is not None:
        report.target = f"{target[0]}:{target[1]}"
        report.connections = await feed(capture, target[0], target[1], **options)
        report.state_note = "the state of a running gateway is not read (--target)"
        return report
    from chargegw.app import Gateway
    from chargegw.store.database import start_embedded

    if not dsn:
        if data_dir is None:
            raise ReplayError("give a database server (dsn) or a data directory")
        dsn = await asyncio.to_thread(start_embedded, data_dir)
    base = settings or load_settings(env={}, overrides={"dsn": dsn})
    async with scratch_database(dsn) as scratch:
        gateway = Gateway(base.model_copy(update={**SCRATCH_OVERRIDES, "dsn": scratch}))
        since = datetime.now(UTC) - timedelta(minutes=1)
        try:
            await gateway.start(http=False)
        except Exception as exc:
            await gateway.stop()
            raise ReplayError(f"the scratch gateway did not start: {exc}") from exc
        try:
            report.connections = await feed(capture, "127.0.0.1", gateway.server.port, **options)
            await gateway.writer.drained()
            assert gateway.pool is not None
            report.new_state, report.state_note = await _read_state(gateway.pool, capture, since)
        finally:
            await gateway.stop()
    if report.new_state is not None:
        if capture.state is None:
            report.state_note = "the capture carries no state record"
        else:
            report.state_differences = compare_state(capture.state, report.new_state)
    return report


async def _read_state(
    pool: asyncpg.Pool, capture: Capture, since: datetime
) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return await _state(pool, capture_devices(capture.frames), since), None
    except ImportError:
        return None, "this installation has no state export (chargegw.ops.frames_export)"
    except (ValueError, asyncpg.PostgresError) as exc:
        return None, f"the replay's state could not be read: {exc}"


# --- live targets -----------------------------------------------------------------------


def _online_devices(api: str, key: str | None, timeout: float) -> list[dict[str, Any]]:
    """Every online device the HTTP API at ``api`` lists (all pages)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {"online": "true", "limit": "1000", **({"cursor": cursor} if cursor else {})}
        url = api.rstrip("/") + "/api/v1/devices?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            page = json.load(response)
        items.extend(page.get("items") or [])
        cursor = page.get("next_cursor")
        if not cursor:
            return items


async def live_refusal(
    host: str,
    devices: set[str],
    *,
    api: str | None,
    api_key: str | None = None,
    timeout: float = 10.0,
) -> str | None:
    """Why feeding the gateway at ``host`` could reach real piles, or None when it is
    safe: the target must be a loopback address and its HTTP API (``api``) must list no
    online device outside ``devices`` (the capture's). Anything that cannot be checked
    is a refusal."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    addresses = {str(info[4][0]) for info in infos}
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a).is_loopback)
    if outside:
        return f"{host} is not a loopback address ({', '.join(outside)})"
    if not api:
        return "cannot tell whether it serves real piles: give its HTTP API with --target-api"
    try:
        online = await asyncio.to_thread(_online_devices, api, api_key, timeout)
    except urllib.error.HTTPError as exc:
        return f"cannot list the target's online devices: {api} answered {exc.code}"
    except (OSError, ValueError) as exc:
        return f"cannot list the target's online devices at {api}: {exc}"
    strangers = sorted(
        str(item.get("device_id"))
        for item in online
        if item.get("device_id") not in devices and item.get("gateway_id") not in devices
    )
    if strangers:
        shown = ", ".join(strangers[:5]) + (" ..." if len(strangers) > 5 else "")
        return f"the target serves {len(strangers)} online device(s) not in the capture: {shown}"
    return None
