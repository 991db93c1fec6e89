"""Bare piles for gateway tests: real TCP, real bytes, driven step by step by the test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any, Generic, TypeVar

from chargeproto import Message, MessageReceived, ap3000, bkv

ICCID = b"89860448161870064815"

_M = TypeVar("_M", bound=Message)


class _RawConnection(Generic[_M]):
    """One TCP connection; what the server sends is decoded and kept until expected."""

    def __init__(self, decoder: Any) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = decoder
        self.received: list[_M] = []
        self.raw: list[bytes] = []

    async def open(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)

    async def send_raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def expect_with_bytes(self, cls: type[_M], timeout: float = 5.0) -> tuple[_M, bytes]:
        """Wait for the next frame of class ``cls``; return it with its bytes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for index, message in enumerate(self.received):
                if isinstance(message, cls):
                    return self.received.pop(index), self.raw.pop(index)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {cls.__name__} within {timeout} s; got {self.received}")
            assert self.reader is not None
            data = await asyncio.wait_for(self.reader.read(4096), remaining)
            if not data:
                raise AssertionError(f"connection closed while waiting for {cls.__name__}")
            for event in self.decoder.feed(data):
                if isinstance(event, MessageReceived):
                    self.received.append(event.message)  # type: ignore[arg-type]
                    self.raw.append(event.raw)

    async def expect(self, cls: type[_M], timeout: float = 5.0) -> _M:
        """Wait for the next frame of class ``cls``."""
        return (await self.expect_with_bytes(cls, timeout))[0]

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


class RawPile(_RawConnection[ap3000.Ap3000Message]):
    """An AP3000 pile."""

    def __init__(self, phy_id: str = "04CEAA40") -> None:
        super().__init__(ap3000.Ap3000StreamDecoder("down"))
        self.phy_id = phy_id
        self._ids = itertools.count(1)

    async def connect(self, port: int, *, iccid: bytes | None = ICCID) -> RawPile:
        await self.open(port)
        if iccid:
            await self.send_raw(iccid)
        return self

    def next_id(self) -> int:
        return next(self._ids)

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
        ports = tuple(ap3000.PortState(i, s) for i, s in enumerate(statuses))
        await self.send(
            ap3000.Heartbeat(
                self.phy_id,
                msg_id,
                voltage_v=221.5,
                ports=ports,
                signal_strength=20,
                temperature_c=30,
            )
        )
        return msg_id


class RawBkvGateway(_RawConnection[bkv.BkvMessage]):
    """A BKV gateway."""

    def __init__(self) -> None:
        super().__init__(bkv.BkvStreamDecoder())

    async def connect(self, port: int) -> RawBkvGateway:
        await self.open(port)
        return self
