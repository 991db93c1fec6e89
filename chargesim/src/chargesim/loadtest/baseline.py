"""The baseline: the least a server must do to keep the same piles connected.

uvloop, one ``asyncio.BufferedProtocol`` per connection reading into one buffer shared
by the process, hand-written ``struct.unpack_from`` framing with length, checksum and
tail checks, and replies packed with ``struct``: AP3000 0x20 registration, 0x21
heartbeat (result 0) and 0x22 time request; BKV 0x0000 heartbeat (the time, UTC+8) and
the ACK of a 0x1000/0x1017 status cluster. Nothing else is answered, nothing is stored,
and there is no chargeproto in the hot path (tests decode its replies with chargeproto).

``python -m chargesim.loadtest.baseline --port P --processes N`` starts N processes
sharing the port with SO_REUSEPORT; it prints one JSON line ``{"type": "ready"}`` when
all listen, and ``{"type": "final", ...}`` with its counters when stopped (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import signal
import struct
import subprocess
import sys
import time
from typing import Any, Final

#: largest frame accepted (the gateway's AP3000 default is 512; BKV frames are < 300)
MAX_FRAME: Final = 1024
_READ_BUFFER: Final = 65536
_DNY: Final = b"DNY"
_LINK: Final = b"link"
_HEX_DIGITS: Final = frozenset(b"0123456789ABCDEFabcdef")
_BKV_TAIL: Final = b"\xfc\xee"
_UTC8: Final = dt.timezone(dt.timedelta(hours=8))

# AP3000: "DNY", length u16, phy id u32, msg id u16, command u8 (little-endian)
_AP_HEAD: Final = struct.Struct("<HIHB")
_AP_RESULT: Final = struct.Struct("<3sHIHBB")
_AP_TIME: Final = struct.Struct("<3sHIHBI")
_U16LE: Final = struct.Struct("<H")
# BKV: header fc fe/ff, length u16, command u16, seq u32, direction u8 (big-endian)
_BKV_HEAD: Final = struct.Struct(">HHIB")
_U16BE: Final = struct.Struct(">H")


@dataclasses.dataclass(slots=True)
class BaselineCounters:
    """What a baseline process counts."""

    connections: int = 0
    accepted: int = 0
    frames_in: int = 0
    frames_out: int = 0
    bad_frames: int = 0
    garbage_bytes: int = 0


class BaselineServer:
    """One process's listener state: the shared read buffer and the counters."""

    def __init__(self) -> None:
        self.buffer = bytearray(_READ_BUFFER)
        self.view = memoryview(self.buffer)
        self.counters = BaselineCounters()
        self._clock_second = -1
        self._clock_bcd = b""

    def bcd_now(self) -> bytes:
        """The local time (UTC+8) as 7 BCD bytes, cached per second."""
        second = int(time.time())
        if second != self._clock_second:
            now = dt.datetime.fromtimestamp(second, _UTC8)
            self._clock_bcd = bytes.fromhex(now.strftime("%Y%m%d%H%M%S"))
            self._clock_second = second
        return self._clock_bcd


def ap3000_reply(phy: int, msg_id: int, command: int, result: int = 0) -> bytes:
    """An AP3000 one-byte-result reply (0x20, 0x21 and the like)."""
    body = _AP_RESULT.pack(_DNY, 10, phy, msg_id, command, result)
    return body + _U16LE.pack(sum(body) & 0xFFFF)


def ap3000_time_reply(phy: int, msg_id: int, unix: int) -> bytes:
    """The AP3000 0x22 answer: the server time as Unix seconds."""
    body = _AP_TIME.pack(_DNY, 13, phy, msg_id, 0x22, unix)
    return body + _U16LE.pack(sum(body) & 0xFFFF)


def _bkv_frame(command: int, seq: int, gateway: bytes, payload: bytes) -> bytes:
    length = 2 + 4 + 1 + 7 + len(payload) + 3
    body = _BKV_HEAD.pack(length, command, seq, 0) + gateway + payload
    return b"\xfc\xff" + body + bytes((sum(body) & 0xFF,)) + _BKV_TAIL


def bkv_heartbeat_reply(seq: int, gateway: bytes, bcd_time: bytes) -> bytes:
    """The BKV 0x0000 answer: the server's local time in BCD."""
    return _bkv_frame(0x0000, seq, gateway, bcd_time)


def bkv_status_ack(seq: int, gateway: bytes, header_items: bytes) -> bytes:
    """The ACK of a 0x1000/0x1017 status cluster: its header items, then result 1."""
    return _bkv_frame(0x1000, seq, gateway, header_items + b"\x03\x01\x0f\x01")


def _header_items(data: Any, start: int, end: int) -> tuple[int, int] | None:
    """(bkv command id, end of the three header items) of a TLV payload, or None."""
    at = start
    command = -1
    for _ in range(3):
        if at + 3 > end:
            return None
        size = data[at]
        if size < 2 or at + 1 + size > end:
            return None
        if data[at + 2] == 0x01 and size == 4:
            command = _U16BE.unpack_from(data, at + 3)[0]
        at += 1 + size
    return (command, at) if command >= 0 else None


class BaselineLink(asyncio.BufferedProtocol):
    """One connection: frames split by hand, heartbeats answered."""

    __slots__ = ("pending", "server", "transport")

    def __init__(self, server: BaselineServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.counters.connections += 1
        self.server.counters.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.counters.connections -= 1
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.view

    def buffer_updated(self, nbytes: int) -> None:
        view = self.server.view[:nbytes]
        data: Any = self.pending + view if self.pending else view
        replies: list[bytes] = []
        used = self.parse(data, replies)
        rest = len(data) - used
        self.pending = bytes(data[used:]) if rest else b""
        if rest > MAX_FRAME:  # never completes: drop it
            self.server.counters.garbage_bytes += rest
            self.pending = b""
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))
            self.server.counters.frames_out += len(replies)

    def parse(self, data: Any, replies: list[bytes]) -> int:
        """Handle every complete item of ``data``; return how many bytes were used."""
        counters = self.server.counters
        size = len(data)
        at = 0
        while at < size:
            first = data[at]
            left = size - at
            if first == 0x44:  # "D"
                if left < 5:
                    return at
                if data[at : at + 3] != _DNY:
                    at = self._skip(at)
                    continue
                length = _U16LE.unpack_from(data, at + 3)[0]
                total = length + 5
                if length < 9 or total > MAX_FRAME:
                    counters.bad_frames += 1
                    at = self._skip(at)
                    continue
                if left < total:
                    return at
                end = at + total
                if sum(data[at : end - 2]) & 0xFFFF != _U16LE.unpack_from(data, end - 2)[0]:
                    counters.bad_frames += 1
                    at = self._skip(at)
                    continue
                counters.frames_in += 1
                phy, msg_id, command = _AP_HEAD.unpack_from(data, at + 3)[1:]
                if command in (0x20, 0x21):
                    replies.append(ap3000_reply(phy, msg_id, command))
                elif command == 0x22:
                    replies.append(ap3000_time_reply(phy, msg_id, int(time.time())))
                at = end
            elif first == 0xFC:
                if left < 4:
                    return at
                if data[at + 1] not in (0xFE, 0xFF):
                    at = self._skip(at)
                    continue
                length = _U16BE.unpack_from(data, at + 2)[0]
                total = length + 4
                if length < 17 or total > MAX_FRAME:
                    counters.bad_frames += 1
                    at = self._skip(at)
                    continue
                if left < total:
                    return at
                end = at + total
                if (
                    data[end - 2 : end] != _BKV_TAIL
                    or sum(data[at + 2 : end - 3]) & 0xFF != (data[end - 3])
                ):
                    counters.bad_frames += 1
                    at = self._skip(at)
                    continue
                counters.frames_in += 1
                _, command, seq, _ = _BKV_HEAD.unpack_from(data, at + 2)
                gateway = bytes(data[at + 11 : at + 18])
                if command == 0x0000:
                    replies.append(bkv_heartbeat_reply(seq, gateway, self.server.bcd_now()))
                elif command == 0x1000:
                    header = _header_items(data, at + 18, end - 3)
                    if header is not None and header[0] == 0x1017:
                        items = bytes(data[at + 18 : header[1]])
                        replies.append(bkv_status_ack(seq, gateway, items))
                at = end
            elif first == 0x38:  # "8": an ICCID preamble, 20 hex characters
                if left < 20:
                    return at
                if data[at + 1] == 0x39 and all(b in _HEX_DIGITS for b in data[at : at + 20]):
                    at += 20
                else:
                    at = self._skip(at)
            elif first == 0x6C:  # "l": the link keepalive
                if left < 4:
                    return at
                at = at + 4 if data[at : at + 4] == _LINK else self._skip(at)
            else:
                at = self._skip(at)
        return at

    def _skip(self, at: int) -> int:
        self.server.counters.garbage_bytes += 1
        return at + 1


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled or SIGTERM/SIGINT; print the final counters."""
    server = BaselineServer()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: BaselineLink(server), host, port, reuse_port=True, backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        listener.close()
        _print({"type": "final", **dataclasses.asdict(server.counters)})


def _print(item: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(item) + "\n")
    sys.stdout.flush()


async def _main(host: str, port: int, processes: int, child: bool) -> None:
    ready = asyncio.Event()
    task = asyncio.create_task(serve(host, port, ready))
    await ready.wait()
    children: list[subprocess.Popen[bytes]] = []
    if not child:
        command = [sys.executable, "-m", "chargesim.loadtest.baseline", "--child"]
        command += ["--host", host, "--port", str(port)]
        for _ in range(processes - 1):
            proc = subprocess.Popen(command, stdout=subprocess.PIPE)
            children.append(proc)
        for proc in children:  # each says "ready" once it listens
            assert proc.stdout is not None
            await asyncio.to_thread(proc.stdout.readline)
        _print({"type": "ready", "pids": [p.pid for p in children]})
    else:
        _print({"type": "ready"})
    try:
        await task
    finally:
        for proc in children:
            proc.terminate()
        for proc in children:
            await asyncio.to_thread(proc.wait)


def main(argv: list[str] | None = None) -> None:
    """``python -m chargesim.loadtest.baseline [--host H] --port P [--processes N]``."""
    parser = argparse.ArgumentParser(prog="python -m chargesim.loadtest.baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from chargesim.loadtest.stats import raise_open_files_limit

    raise_open_files_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(args.host, args.port, max(1, args.processes), args.child))
    else:
        uvloop.run(_main(args.host, args.port, max(1, args.processes), args.child))


if __name__ == "__main__":
    main()
