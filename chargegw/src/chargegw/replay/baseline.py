"""``--record-baseline``: make a capture's expected replies those of the current code.

The device frames and the recorded server-initiated frames stay as they are; the
recorded replies are replaced by the replay's replies (as the audit log masks them),
each placed after the device frame it followed and stamped with the time it arrived in
the replay (the ``clock`` rule judges a server time against the time of its frame); the
state record becomes the replay's state when it was read. The file is rewritten atomically (a
temporary file in the same directory, then a rename).
"""

from __future__ import annotations

import os
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from chargegw.capture import Capture, CaptureFrame, header, write_capture
from chargegw.replay.compare import recorded_replies
from chargegw.replay.frames import frame_protocol, usable_bytes
from chargegw.replay.report import ReplayReport


def baseline_frames(capture: Capture, report: ReplayReport) -> list[CaptureFrame]:
    """The capture's frames with its replies replaced by the replay's."""
    results = {result.connection: result for result in report.connections}
    ordered: list[tuple[datetime, int, int, CaptureFrame]] = []
    for conn_index, (name, frames) in enumerate(capture.connections().items()):
        replies, _ = recorded_replies(frames)
        replaced = {id(reply.frame) for reply in replies}
        new_after: dict[int, list[CaptureFrame]] = {}
        anchor: dict[int, datetime] = {}
        result = results.get(name)
        by_line = {frame.line: frame for frame in frames}
        first = frames[0]
        for new in result.new_frames if result is not None else []:
            if not new.reply:
                continue
            before = by_line.get(new.after_line, first)
            frame = CaptureFrame(
                at=new.at,
                direction="out",
                connection=name,
                protocol=frame_protocol(usable_bytes(new.hex)),
                hex=new.hex,
                device_id=before.device_id,
                command=new.command,
            )
            anchor[id(frame)] = before.at
            new_after.setdefault(new.after_line, []).append(frame)
        rebuilt = list(new_after.pop(0, []))
        for frame in frames:
            if id(frame) not in replaced:
                rebuilt.append(frame)
            if frame.direction == "in":
                rebuilt.extend(new_after.pop(frame.line, []))
        for rest in new_after.values():
            rebuilt.extend(rest)
        # the file keeps the capture's timeline: a new reply sorts at the time of the
        # device frame it followed, and a connection's frames never go back in time
        latest = first.at
        for seq, frame in enumerate(rebuilt):
            latest = max(latest, anchor.get(id(frame), frame.at))
            ordered.append((latest, conn_index, seq, frame))
    ordered.sort(key=lambda item: item[:3])
    return [item[3] for item in ordered]


def write_baseline(path: str | Path, capture: Capture, report: ReplayReport) -> int:
    """Rewrite the capture at ``path`` with the replay's replies (and state, when read);
    the number of frames written."""
    target = Path(path)
    head = dict(capture.header) or header("chargegw replay --record-baseline")
    head["baseline"] = {
        "recorded_at": datetime.now(UTC).isoformat(),
        "by": "chargegw replay --record-baseline",
        "mode": report.mode,
    }
    state = report.new_state if report.new_state is not None else capture.state
    frames = baseline_frames(capture, report)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or "."
    )
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            count = write_capture(out, frames, head=head, state=state)
        # the rewritten file keeps the permissions of the one it replaces
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else _default_mode()
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return count


def _default_mode() -> int:
    """0o666 less the process's umask, as ``open()`` would create a file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
