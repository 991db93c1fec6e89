"""``chargegw compliance report``: protocol compliance per firmware, for a person.

The numbers are :func:`chargegw.domain.compliance.report`'s, the same as
``GET /api/v1/compliance`` (docs/compliance.md).
"""

from __future__ import annotations

import json

from chargegw.domain.compliance import FirmwareCompliance

__all__ = ["as_json", "render"]


def as_json(items: list[FirmwareCompliance]) -> str:
    """The report as the API's JSON (``{"items": [...]}``)."""
    return json.dumps({"items": [item.model_dump(mode="json") for item in items]}, indent=2)


def render(items: list[FirmwareCompliance]) -> list[str]:
    """A table per firmware, lowest score first, then its top deviations with one
    example frame each."""
    if not items:
        return ["nothing counted yet (counts reach the database every compliance_flush_s)"]
    head = ("PROTOCOL", "TYPE", "FIRMWARE", "DEVICES", "FRAMES", "DEVIATIONS", "SCORE")
    rows = [head]
    for item in items:
        rows.append(
            (
                item.protocol,
                item.device_type or "?",
                item.firmware or "?",
                str(item.devices),
                str(item.frames),
                str(item.deviations),
                f"{item.score:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for item in items:
        if not item.top:
            continue
        name = f"{item.protocol} {item.device_type or '?'} firmware {item.firmware or '?'}"
        lines += ["", f"{name}: score {item.score:.1f}, top deviations"]
        for dev in item.top:
            tolerated = f", {dev.tolerated} tolerated" if dev.tolerated else ""
            lines.append(
                f"  {dev.kind.value:<20} {dev.count:>8} x weight {dev.weight}{tolerated}"
                f"  (last {dev.last_seen.isoformat(timespec='seconds')})"
            )
            if dev.examples:
                ex = dev.examples[0]
                ident = f"frame {ex.frame_id}" if ex.frame_id is not None else "frame"
                lines.append(f"      e.g. {ident} {ex.command or ''}: {ex.detail}".rstrip())
                if ex.hex:
                    lines.append(f"      {ex.hex}")
    return lines
