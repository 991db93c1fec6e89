"""A bare AP3000 pile for gateway tests: real TCP, real bytes, driven step by step."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from chargeproto import MessageReceived, ap3000, bkv

ICCID = b"89860448161870064815"


class RawPile:
    """One TCP connection speaking AP3000 through chargeproto, under the test's control."""

    def __init__(self, phy_id: str = "04CEAA40") -> None:
        self.phy_id = phy_id
        self._ids = itertools.count(1)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = ap3000.Ap3000StreamDecoder("down")
        self.received: list[ap3000.Ap3000Message] = []

    async def connect(self, port: int, *, iccid: bytes | None = ICCID) -> RawPile:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        if iccid:
            await self.send_raw(iccid)
        return self

    def next_id(self) -> int:
        return next(self._ids)

    async def send_raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, message: ap3000.Ap3000Message) -> None:
        await self.send_raw(ap3000.encode(message))

    async def register(self, ports: int = 2) -> None:
        await self.send(
            ap3000.Registration(
                self.phy_id,
                self.next_id(),
                firmware_version=126,
                port_count=ports,
                virtual_id=0,
                device_type=0x21,
                work_mode=0,
                power_board_version=0,
            )
        )

    async def heartbeat(self, statuses: tuple[int, ...] = (0, 0)) -> int:
        msg_id = self.next_id()
        await self.send(
            ap3000.Heartbeat(
                self.phy_id,
                msg_id,
                voltage_v=221.5,
                ports=tuple(ap3000.PortState(i, s) for i, s in enumerate(statuses)),
                signal_strength=20,
                temperature_c=30,
            )
        )
        return msg_id

    async def expect(
        self, cls: type[ap3000.Ap3000Message], timeout: float = 5.0
    ) -> ap3000.Ap3000Message:
        """Wait for the next frame of class ``cls`` from the server."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for index, message in enumerate(self.received):
                if isinstance(message, cls):
                    return self.received.pop(index)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no {cls.__name__} within {timeout} s; got {self.received}")
            assert self.reader is not None
            data = await asyncio.wait_for(self.reader.read(4096), remaining)
            if not data:
                raise AssertionError(f"connection closed while waiting for {cls.__name__}")
            for event in self.decoder.feed(data):
                if isinstance(event, MessageReceived):
                    assert isinstance(event.message, ap3000.Ap3000Message)
                    self.received.append(event.message)

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        assert self.reader is not None
        try:
            while await asyncio.wait_for(self.reader.read(4096), timeout):
                pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()


class RawBkvGateway:
    """One TCP connection speaking BKV through chargeproto, under the test's control."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = bkv.BkvStreamDecoder()
        self.received: list[bkv.BkvMessage] = []
        self.raw: list[bytes] = []

    async def connect(self, port: int) -> RawBkvGateway:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        return self

    async def send_raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def expect(
        self, cls: type[bkv.BkvMessage], timeout: float = 5.0
    ) -> tuple[bkv.BkvMessage, bytes]:
        """Wait for the next frame of class ``cls``; returns it with its bytes."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for index, message in enumerate(self.received):
                if isinstance(message, cls):
                    return self.received.pop(index), self.raw.pop(index)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no {cls.__name__} within {timeout} s; got {self.received}")
            assert self.reader is not None
            data = await asyncio.wait_for(self.reader.read(4096), remaining)
            if not data:
                raise AssertionError(f"connection closed while waiting for {cls.__name__}")
            for event in self.decoder.feed(data):
                if isinstance(event, MessageReceived):
                    assert isinstance(event.message, bkv.BkvMessage)
                    self.received.append(event.message)
                    self.raw.append(event.raw)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
