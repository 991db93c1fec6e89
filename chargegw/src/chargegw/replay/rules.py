"""Volatile fields: reply fields that legitimately differ between two runs.

They are compared by rule, not as differences (docs/replay.md#volatile-fields holds the
same table for people). A rule names the protocol and message class it applies to
(None: any), the field (a path of :func:`chargegw.replay.frames.flat_fields`) and how the
field is judged:

- ``clock``: the server's clock. The recorded value's offset from the time its frame was
  recorded must equal the new value's offset from the time its frame arrived, within a
  tolerance. Time zones therefore cancel out; a gateway that starts answering in another
  zone, or with a wrong clock, is still a difference.
- ``chosen``: a value the server picks (a number it allocates); only its presence is
  compared.
- ``derived``: computed from the other fields (a checksum); any real change shows in the
  field it follows.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime
from typing import Any


class RuleKind(str, enum.Enum):
    """How a volatile field is judged."""

    CLOCK = "clock"
    CHOSEN = "chosen"
    DERIVED = "derived"


@dataclasses.dataclass(frozen=True, slots=True)
class VolatileRule:
    """One row of :data:`VOLATILE_RULES`."""

    protocol: str | None
    message: str | None
    field: str
    kind: RuleKind
    why: str

    def applies(self, protocol: str, message: str, field: str) -> bool:
        """Whether this rule covers ``field`` of a ``message`` of ``protocol``."""
        return (
            self.field == field
            and self.protocol in (None, protocol)
            and self.message in (None, message)
        )


VOLATILE_RULES: tuple[VolatileRule, ...] = (
    VolatileRule(
        "ap3000", "TimeReply", "fields.timestamp_unix", RuleKind.CLOCK, "server time (0x22 reply)"
    ),
    VolatileRule(
        "ap3000",
        "HostTimeReply",
        "fields.timestamp_unix",
        RuleKind.CLOCK,
        "server time (0x12 reply to a host)",
    ),
    VolatileRule(
        "bkv",
        "HeartbeatReply",
        "fields.server_time",
        RuleKind.CLOCK,
        "server time, local time of day (0x0000 reply)",
    ),
    VolatileRule(
        "bkv",
        "CardOrder",
        "fields.business_no",
        RuleKind.CHOSEN,
        "business number the server allocates for a card start",
    ),
    VolatileRule(None, None, "checksum", RuleKind.DERIVED, "frame checksum, follows the fields"),
)

#: the default tolerance of ``clock`` fields, seconds
CLOCK_TOLERANCE_S = 60.0


def rule_for(protocol: str, message: str, field: str) -> VolatileRule | None:
    """The rule covering a field, or None (the field must be equal)."""
    for rule in VOLATILE_RULES:
        if rule.applies(protocol, message, field):
            return rule
    return None


def _as_time(value: Any) -> datetime | None:
    """A clock field as a naive datetime (unix seconds as UTC; text as written)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed.replace(tzinfo=None) if parsed.tzinfo is None else _naive_utc(parsed)
    return None


def _naive_utc(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(tzinfo=None)


def clock_offset(value: Any, at: datetime) -> float | None:
    """Seconds between a clock field and the time its frame was seen (None when the
    value is no time)."""
    moment = _as_time(value)
    if moment is None:
        return None
    return (moment - _naive_utc(at)).total_seconds()


def judge(
    rule: VolatileRule,
    old: Any,
    new: Any,
    old_at: datetime,
    new_at: datetime,
    tolerance_s: float = CLOCK_TOLERANCE_S,
) -> tuple[bool, str]:
    """Whether ``old`` -> ``new`` is allowed by ``rule``, and a note saying why."""
    if rule.kind is RuleKind.DERIVED:
        return True, rule.why
    if rule.kind is RuleKind.CHOSEN:
        both = old is not None and new is not None
        return both, rule.why if both else f"{rule.why}: missing on one side"
    before = clock_offset(old, old_at)
    after = clock_offset(new, new_at)
    if before is None or after is None:
        return False, f"{rule.why}: not a time"
    drift = after - before
    ok = abs(drift) <= tolerance_s
    return ok, f"{rule.why}: offset {drift:+.1f} s (tolerance {tolerance_s:g} s)"
