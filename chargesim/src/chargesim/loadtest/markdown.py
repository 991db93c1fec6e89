"""The load-test section of docs/benchmarks.md, rendered from a report.

Only the text between ``<!-- load:begin -->`` and ``<!-- load:end -->`` is replaced;
the file's other sections belong to other scripts. Without the markers, the section is
appended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

BEGIN: Final = "<!-- load:begin -->"
END: Final = "<!-- load:end -->"


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:,.2f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.0f}"
    elif isinstance(value, int):
        value = f"{value:,}"
    return f"{value}{unit}"


def _get(run: dict[str, Any], *path: str) -> Any:
    value: Any = run
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _mib(kib: Any) -> float | None:
    return None if not isinstance(kib, int | float) else kib / 1024


def _pair(run: dict[str, Any], key: str) -> str:
    block = run.get(key) or {}
    return f"{_cell(block.get('p50'))} / {_cell(block.get('p99'))} ms"


def _storm(run: dict[str, Any]) -> str:
    storm = run.get("storm")
    if not storm:
        return "-"
    return f"{_cell(storm['dropped'])} / {_cell(storm['back_online'])}"


def _latency(run: dict[str, Any]) -> str:
    latency = run.get("latency")
    if not latency:
        return "-"
    total = latency["legs_ms"]["total"]
    return (
        f"{_cell(total['p50'])} / {_cell(total['p99'])} / {_cell(total['max'])} ms "
        f"({total['count']} of {latency['probes']} probes)"
    )


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of every table row for one run."""
    return [
        ("piles (AP3000 + BKV gateways)", f"{r['piles']['ap3000']:,} + {r['piles']['bkv']:,}"),
        (
            "connections held (min-max, steady)",
            f"{_cell(_get(r, 'connections', 'held_min'))}-"
            f"{_cell(_get(r, 'connections', 'held_max'))}",
        ),
        ("all online after", _cell(_get(r, "connections", "all_online_after_s"), " s")),
        ("server processes", _cell(len(r["server_processes"]))),
        ("server RSS, steady", _cell(_mib(_get(r, "memory", "server_rss_kib_steady")), " MiB")),
        ("server RSS per pile (above idle)", _cell(_get(r, "memory", "rss_per_pile_kib"), " KiB")),
        ("server RSS per pile (total)", _cell(_get(r, "memory", "rss_total_per_pile_kib"), " KiB")),
        ("offered frames/s (configured)", _cell(_get(r, "frames", "offered_to_server_per_s"))),
        ("frames/s to the server", _cell(_get(r, "frames", "to_server_per_s"))),
        ("frames/s from the server", _cell(_get(r, "frames", "from_server_per_s"))),
        ("server CPU, steady", _cell(_get(r, "frames", "server_cpu_percent"), " %")),
        ("server CPU per frame", _cell(_get(r, "frames", "server_cpu_us_per_frame"), " us")),
        ("heartbeat round trip p50 / p99", _pair(r, "heartbeat_rtt_ms")),
        ("database rows/s", _cell(_get(r, "database", "rows_per_s"))),
        ("decode errors", _cell(_get(r, "errors", "decode_errors"))),
        ("unintended disconnects", _cell(_get(r, "errors", "unintended_disconnects"))),
        ("storm: piles dropped / back", _storm(r)),
        ("storm: all back online after", _cell(_get(r, "storm", "all_back_after_s"), " s")),
        ("API command to pile ACK p50 / p99 / max", _latency(r)),
        ("generator RSS per pile", _cell(_get(r, "generators", "rss_per_pile_kib"), " KiB")),
    ]


def render(report: dict[str, Any]) -> str:
    """The markdown section (without the markers) for a report."""
    machine, versions = report["machine"], report["versions"]
    runs = report["runs"]
    lines = [
        "## Load test (`chargegw loadtest`)",
        "",
        f"Measured {report['date']} on {machine['cpu_model']} ({machine['cores']} logical "
        f"CPUs, {machine['memory_gib']} GiB), {machine['system']}, Python "
        f"{versions['python']}, uvloop {versions.get('uvloop')}, PostgreSQL "
        f"{versions.get('postgresql') or '-'}; open files {machine['open_files_limit']['hard']:,} "
        "per process. The load generator runs on the same cores. Command:",
        "",
        "```",
        report["command"],
        "```",
        "",
        "| | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    table = [_rows(run) for run in runs.values()]
    for i, (label, _) in enumerate(table[0]):
        lines.append(f"| {label} | " + " | ".join(rows[i][1] for rows in table) + " |")
    ratios = report.get("ratios")
    if ratios:
        lines += [
            "",
            "chargegw / baseline, same run: "
            + ", ".join(f"{name.replace('_', ' ')} **{_cell(v)}x**" for name, v in ratios.items())
            + ".",
        ]
    lines += [
        "",
        "How to read it: docs/loadtest.md. Frames/s follow the offered load until a server "
        "saturates; compare capacity by raising `--accel` until the round trip climbs.",
    ]
    return "\n".join(lines)


def update_section(path: str | Path, report: dict[str, Any]) -> None:
    """Replace (or append) the marked load-test section of ``path``."""
    target = Path(path)
    text = target.read_text() if target.exists() else ""
    section = f"{BEGIN}\n{render(report)}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    target.write_text(text)
