"""What a driver may use of the gateway."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from ..config import Settings
from ..sessions import SessionRegistry
from ..store.writer import BatchWriter
from ..transport import DeviceLink


class DriverContext(Protocol):
    """The gateway as a driver sees it."""

    settings: Settings
    sessions: SessionRegistry
    writer: BatchWriter

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
