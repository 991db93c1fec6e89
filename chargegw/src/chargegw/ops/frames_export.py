"""``chargegw frames export``: an extract of the audit log as a capture file.

:func:`export_frames` reads the frames of some devices in a window, oldest first (ties
by id), with the frames of those devices' connections that name no device (the ICCID a
pile sends first, bytes that did not decode: a replay needs them to play the connection
as it was), and the recorded state of those devices
(:func:`chargegw.domain.frames.recorded_state`). :func:`write_export` writes them as a
capture (JSON lines, :func:`chargegw.capture.write_capture`) or a pcap
(:func:`chargegw.capture.write_pcap`), whole or not at all: a file is written next to
its destination and renamed into place. Masked bytes stay masked (``**`` in a capture,
``*`` in a pcap): the hex is copied as the audit log keeps it.

``chargegw replay`` reads the state with the same function, so a capture's state and a
replay's are comparable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from chargegw.capture import CaptureFrame, header, write_capture, write_pcap
from chargegw.domain import frames
from chargegw.domain.frames import Frame, FrameQuery
from chargegw.store.database import Connection

__all__ = [
    "PAGE_ROWS",
    "ExportError",
    "check_output",
    "check_subjects",
    "check_window",
    "export_frames",
    "export_header",
    "write_export",
]

#: frames read per query
PAGE_ROWS = 5000
#: what the CLI writes to a capture's header as its source
SOURCE = "chargegw frames export"

Format = Literal["jsonl", "pcap"]


class ExportError(ValueError):
    """The export cannot be made as asked (an unknown device, an inverted window, a file
    that cannot be written); the message says which."""


def _capture_frame(frame: Frame) -> CaptureFrame:
    return CaptureFrame(
        at=frame.received_at,
        direction=frame.direction,
        connection=frame.connection_id,
        protocol=frame.protocol,
        hex=frame.hex,
        device_id=frame.device_id,
        command=frame.command,
        frame_id=frame.id,
        error=frame.error,
    )


def check_window(since: dt.datetime, until: dt.datetime) -> None:
    """:class:`ExportError` when ``since`` is after ``until``."""
    if since > until:
        raise ExportError(
            f"the window is inverted: since {since.isoformat()} is after until {until.isoformat()}"
        )


async def check_subjects(
    conn: Connection, device_ids: Sequence[str], gateway_id: str | None = None
) -> None:
    """:class:`ExportError` unless every device and the gateway exist (as a device or a
    gateway) and at least one is named."""
    if not device_ids and gateway_id is None:
        raise ExportError("name at least one device (--device) or a gateway (--gateway)")
    named = [*device_ids, *([gateway_id] if gateway_id is not None else [])]
    missing = sorted(set(named) - await frames.known_ids(conn, named))
    if missing:
        raise ExportError(f"no such device or gateway: {', '.join(missing)}")


async def export_frames(
    conn: Connection,
    *,
    device_ids: Sequence[str],
    gateway_id: str | None = None,
    connection_id: str | None = None,
    since: dt.datetime,
    until: dt.datetime,
) -> tuple[list[CaptureFrame], dict[str, Any]]:
    """The frames in ``[since, until)`` of ``device_ids`` and, with ``gateway_id``, of that
    gateway and the devices behind it (only those of ``connection_id`` if given), oldest
    first, ties by id, with the frames of their connections that name no device; and the
    recorded state of those devices (``{"orders", "settlements", "ports", "as_of"}``).

    An id that is neither a device nor a gateway has no frames (:func:`check_subjects`
    says so first where that is an error). :class:`ExportError` when the window is
    inverted or nothing is named."""
    check_window(since, until)
    wanted = set(device_ids)
    if gateway_id is not None:
        wanted.update(await frames.gateway_devices(conn, gateway_id) or [gateway_id])
    if not wanted:
        raise ExportError("name at least one device or a gateway")
    query = FrameQuery(
        since=since, until=until, device_ids=sorted(wanted), connection_id=connection_id
    )
    found: list[Frame] = []
    after: tuple[dt.datetime, int] | None = None
    while True:
        page = await frames.search_frames(conn, query, after=after, limit=PAGE_ROWS, decode=False)
        found.extend(page.items)
        if not page.more:
            break
        after = (page.items[-1].received_at, page.items[-1].id)
    connections = (
        [connection_id] if connection_id is not None else sorted({f.connection_id for f in found})
    )
    found += await frames.connection_orphans(conn, connections, since, until)
    found.sort(key=lambda f: (f.received_at, f.id))
    state = await frames.recorded_state(conn, sorted(wanted), since, until)
    return [_capture_frame(f) for f in found], state


def export_header(
    *,
    device_ids: Sequence[str],
    gateway_id: str | None,
    connection_id: str | None,
    since: dt.datetime,
    until: dt.datetime,
) -> dict[str, Any]:
    """A capture header naming the export's filters."""
    filters: dict[str, Any] = {
        "devices": sorted(device_ids),
        "since": since.isoformat(),
        "until": until.isoformat(),
    }
    if gateway_id is not None:
        filters["gateway"] = gateway_id
    if connection_id is not None:
        filters["connection"] = connection_id
    return header(SOURCE, filters=filters)


def _render(
    fmt: Format,
    captured: Sequence[CaptureFrame],
    head: dict[str, Any] | None,
    state: dict[str, Any] | None,
) -> bytes:
    if fmt == "pcap":
        binary = io.BytesIO()
        write_pcap(binary, captured)
        return binary.getvalue()
    text = io.StringIO()
    write_capture(text, captured, head=head, state=state)
    return text.getvalue().encode("utf-8")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(out: str) -> None:
    """:class:`ExportError` when ``out`` plainly cannot be written (a directory, a folder
    that does not exist or is not writable), to say so before reading the database."""
    if out == "-":
        return
    target = Path(out)
    if target.is_dir():
        raise ExportError(f"cannot write {out}: it is a directory")
    folder = target.parent
    if not folder.is_dir():
        raise ExportError(f"cannot write {out}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {folder} is not writable")


def write_export(
    out: str,
    captured: Sequence[CaptureFrame],
    *,
    fmt: Format = "jsonl",
    head: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> int:
    """Write the frames (and, for ``jsonl``, the header and state) to the file ``out``
    (``-``: standard output); the number of frames. The file is written beside its
    destination and renamed into place, so it is whole or absent; :class:`ExportError`
    if it cannot be written."""
    data = _render(fmt, captured, head, state)
    if out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return len(captured)
    check_output(out)
    target = Path(out)
    try:
        handle, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return len(captured)
