"""What a replay found: per connection, each recorded reply next to the new one; the
state; the capture's bad lines. Rendered for a terminal (:meth:`ReplayReport.lines`)
or as one JSON document (:meth:`ReplayReport.as_json`)."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any

from chargegw.capture import LineProblem


class Outcome(str, enum.Enum):
    """How a recorded reply compares with the new one."""

    IDENTICAL = "identical"
    #: differs only in volatile fields, each within its rule
    VOLATILE = "volatile"
    DIFFERENT = "different"
    #: recorded, not answered now
    MISSING = "missing"
    #: answered now, not recorded
    ADDED = "added"


#: outcomes that make a replay fail
FAILING = frozenset({Outcome.DIFFERENT, Outcome.MISSING, Outcome.ADDED})

_MARK = {
    Outcome.IDENTICAL: "=",
    Outcome.VOLATILE: "~",
    Outcome.DIFFERENT: "!",
    Outcome.MISSING: "-",
    Outcome.ADDED: "+",
}


@dataclasses.dataclass(frozen=True, slots=True)
class FieldChange:
    """A field whose value changed; ``note`` names the volatile rule that allowed it."""

    field: str
    old: Any
    new: Any
    note: str | None = None


@dataclasses.dataclass(slots=True)
class ReplyComparison:
    """A recorded reply and the new one (either may be absent)."""

    outcome: Outcome
    key: str
    recorded_line: int | None = None
    recorded_hex: str | None = None
    new_hex: str | None = None
    changes: list[FieldChange] = dataclasses.field(default_factory=list)
    note: str | None = None
    #: where it goes in the listing: the recorded line, or after the line fed last
    position: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """The comparison as JSON types."""
        return {
            "outcome": self.outcome.value,
            "reply": self.key,
            "recorded_line": self.recorded_line,
            "recorded_hex": self.recorded_hex,
            "new_hex": self.new_hex,
            "changes": [dataclasses.asdict(change) for change in self.changes],
            "note": self.note,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class NotCompared:
    """A frame the server sent on its own (a command), recorded or new: replaying the
    device side cannot reproduce it, so it is listed, not compared."""

    side: str  # "recorded" or "new"
    command: str | None
    hex: str
    why: str
    line: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class NewFrame:
    """A frame the gateway sent during the replay, as the audit log would store it."""

    #: the capture line of the device frame fed just before it arrived (0: none yet)
    after_line: int
    #: when it arrived
    at: datetime
    hex: str
    command: str | None
    #: a reply to a device frame (compared), not a command or undecodable bytes
    reply: bool


@dataclasses.dataclass(slots=True)
class ConnectionResult:
    """One capture connection replayed."""

    connection: str
    devices: list[str]
    fed: int = 0
    skipped: list[LineProblem] = dataclasses.field(default_factory=list)
    replies: list[ReplyComparison] = dataclasses.field(default_factory=list)
    not_compared: list[NotCompared] = dataclasses.field(default_factory=list)
    #: what the gateway sent, in arrival order (for --record-baseline)
    new_frames: list[NewFrame] = dataclasses.field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        """How many replies had ``outcome``."""
        return sum(1 for reply in self.replies if reply.outcome is outcome)

    def as_json(self) -> dict[str, Any]:
        """The connection's result as JSON types."""
        return {
            "connection": self.connection,
            "devices": self.devices,
            "frames_fed": self.fed,
            "skipped": [{"line": p.line, "reason": p.reason} for p in self.skipped],
            "replies": [reply.as_json() for reply in self.replies],
            "not_compared": [dataclasses.asdict(item) for item in self.not_compared],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class StateDifference:
    """A difference between the recorded run's state and the replay's."""

    what: str  # "order" or "port"
    key: str
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.what} {self.key}: {self.field} {self.old!r} -> {self.new!r}"


@dataclasses.dataclass(slots=True)
class ReplayReport:
    """Everything a replay found; :attr:`differs` decides the exit status."""

    capture: str | None
    mode: str
    target: str | None
    connections: list[ConnectionResult]
    problems: list[LineProblem]
    state_differences: list[StateDifference] = dataclasses.field(default_factory=list)
    #: why the state was not compared, when it was not
    state_note: str | None = None
    #: the state the replay produced (None against a target)
    new_state: dict[str, Any] | None = None

    def summary(self) -> dict[str, int]:
        """The counts of the summary table."""
        counts = {
            "connections": len(self.connections),
            "frames_fed": sum(c.fed for c in self.connections),
        }
        for outcome in Outcome:
            counts[outcome.value] = sum(c.count(outcome) for c in self.connections)
        counts["not_compared"] = sum(len(c.not_compared) for c in self.connections)
        counts["state_differences"] = len(self.state_differences)
        counts["line_problems"] = len(self.problems) + sum(len(c.skipped) for c in self.connections)
        return counts

    @property
    def differs(self) -> bool:
        """Whether anything differs: a reply different, missing or added, a state
        difference, or a line of the capture that could not be replayed."""
        counts = self.summary()
        return bool(
            sum(counts[outcome.value] for outcome in FAILING)
            or counts["state_differences"]
            or counts["line_problems"]
        )

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON document."""
        return {
            "capture": self.capture,
            "mode": self.mode,
            "target": self.target,
            "differs": self.differs,
            "summary": self.summary(),
            "problems": [{"line": p.line, "reason": p.reason} for p in self.problems],
            "connections": [c.as_json() for c in self.connections],
            "state": {
                "compared": self.state_note is None,
                "note": self.state_note,
                "differences": [dataclasses.asdict(d) for d in self.state_differences],
            },
        }

    def lines(self, *, verbose: bool = False) -> list[str]:
        """The report for a person: per connection the replies (identical ones, and the
        details of volatile ones, only with ``verbose``), the state, the bad lines, then
        the summary table."""
        out: list[str] = []
        for problem in self.problems:
            out.append(f"capture {problem}")
        for result in self.connections:
            devices = ", ".join(result.devices) or "no device"
            out.append(f"connection {result.connection} ({devices}): {result.fed} frames fed")
            for problem in result.skipped:
                out.append(f"  skipped {problem}")
            for reply in result.replies:
                if reply.outcome is Outcome.IDENTICAL and not verbose:
                    continue
                out.extend(_reply_lines(reply, verbose))
            for item in result.not_compared:
                where = f" line {item.line}" if item.line else ""
                out.append(
                    f"  . {item.side}{where} {item.command or '?'}: {item.why}, not compared"
                )
        if self.state_note is not None:
            out.append(f"state: not compared ({self.state_note})")
        elif self.state_differences:
            out.append("state:")
            out.extend(f"  ! {difference}" for difference in self.state_differences)
        else:
            out.append("state: identical")
        counts = self.summary()
        header = list(counts)
        out.append("")
        out.extend(_table([header, [str(counts[name]) for name in header]]))
        out.append("result: " + ("DIFFERENT" if self.differs else "no difference"))
        return out


def _reply_lines(reply: ReplyComparison, verbose: bool) -> list[str]:
    where = f" (line {reply.recorded_line})" if reply.recorded_line else ""
    head = f"  {_MARK[reply.outcome]} {reply.key}{where}: {reply.outcome.value}"
    if reply.note:
        head += f" ({reply.note})"
    out = [head]
    if reply.outcome is Outcome.VOLATILE and not verbose:
        return out
    if reply.outcome is Outcome.MISSING:
        out.append(f"      recorded {reply.recorded_hex}")
    elif reply.outcome is Outcome.ADDED:
        out.append(f"      new      {reply.new_hex}")
    elif reply.outcome is not Outcome.IDENTICAL:
        out.append(f"      recorded {reply.recorded_hex}")
        out.append(f"      new      {reply.new_hex}")
        for change in reply.changes:
            why = f"  [{change.note}]" if change.note else ""
            out.append(f"      {change.field}: {change.old!r} -> {change.new!r}{why}")
    return out


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) for row in rows]
