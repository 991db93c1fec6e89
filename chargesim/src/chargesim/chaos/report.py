"""The chaos run's table, violation listing and JSON report."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chargesim.chaos.checks import InvariantResult

#: violations listed per invariant on the terminal (all are in the JSON report)
_SHOWN = 10
_FRAMES_SHOWN = 6


def table(results: Iterable[InvariantResult]) -> str:
    """``invariant | checked | violations`` for people."""
    rows = [(f"{r.key}  {r.title}", str(r.checked), str(len(r.violations))) for r in results]
    head = ("invariant", "checked", "violations")
    width = max(len(head[0]), *(len(r[0]) for r in rows))
    lines = [f"{head[0]:<{width}}  {head[1]:>8}  {head[2]:>10}", "-" * (width + 22)]
    lines += [f"{name:<{width}}  {checked:>8}  {bad:>10}" for name, checked, bad in rows]
    return "\n".join(lines)


def violations_text(results: Iterable[InvariantResult], shown: int = _SHOWN) -> str:
    """Each violation: what, the device and port, the orders, a few audit frames."""
    out: list[str] = []
    for result in results:
        if not result.violations:
            continue
        out.append(f"\n{result.key}: {result.title} ({len(result.violations)} violations)")
        for v in result.violations[:shown]:
            where = v.device_id or "-"
            if v.port is not None:
                where += f" port {v.port}"
            orders = ", ".join(v.orders) if v.orders else "-"
            out.append(f"  - {v.what}\n    device {where}; orders {orders}")
            for frame in v.frames[:_FRAMES_SHOWN]:
                hex_text = frame["hex"]
                if len(hex_text) > 96:
                    hex_text = hex_text[:96] + "..."
                out.append(
                    f"      {frame['received_at'][11:23]} {frame['direction']:<3} "
                    f"{frame['command'] or '-':<14} {hex_text}"
                )
        if len(result.violations) > shown:
            out.append(f"  ... {len(result.violations) - shown} more in the JSON report")
    return "\n".join(out)


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    """The whole report as JSON (datetimes as ISO text)."""
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
