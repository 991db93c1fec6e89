"""The load-test section of docs/benchmarks.md, rendered from a report.

Only the text between ``<!-- load:begin -->`` and ``<!-- load:end -->`` is replaced;
the file's other sections belong to other scripts. Without the markers, the section is
appended. A run of ``--profile overload`` has its own section, between
``<!-- load-overload:begin -->`` and ``<!-- load-overload:end -->`` (first placed right
after the load-test section), and leaves the load-test section as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

BEGIN: Final = "<!-- load:begin -->"
END: Final = "<!-- load:end -->"
OVERLOAD_BEGIN: Final = "<!-- load-overload:begin -->"
OVERLOAD_END: Final = "<!-- load-overload:end -->"
#: phases of the overload profile, in order
_PHASES: Final = ("ramp", "capacity", "overload", "recovery")


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


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("**yes**" if value else "**no**")


def _readyz(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} x{n}" for status, n in sorted(counts.items())) or "-"


def _overload_run(kind: str, run: dict[str, Any]) -> list[str]:
    """The lines of one run's overload result."""
    result = run["overload"]
    capacity, verdicts, phases = result["capacity"], result["verdicts"], result["phases"]
    piles = run["piles"]
    if capacity["measured"]:
        how = (
            f"measured: the offered rate doubled every step until the server fell behind; "
            f"limited by {capacity['limited_by']}"
        )
    else:
        how = "given with `--capacity`"
    lines = [
        f"**{kind}** ({len(run['server_processes'])} server processes), "
        f"{piles['ap3000']:,} AP3000 piles + {piles['bkv']:,} BKV gateways: capacity "
        f"**{_cell(capacity['frames_per_s'])} answered frames/s** ({how}).",
        "",
        "| phase | seconds | offered frames/s | sent | answered | heartbeat p50 / p99 "
        "| worst 1-s p99 | heartbeats unanswered | piles online | disconnects | server CPU "
        "| generator CPU | /readyz |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in _PHASES:
        phase = phases.get(name)
        if phase is None:
            continue
        lines.append(
            f"| {name} | {_cell(phase['seconds'])} | {_cell(phase['offered_per_s'])} "
            f"| {_cell(phase['sent_per_s'])} | {_cell(phase['answered_per_s'])} "
            f"| {_pair(phase, 'heartbeat_rtt_ms')} "
            f"| {_cell(phase.get('rtt_p99_worst_1s_ms'), ' ms')} "
            f"| {_cell(phase['heartbeats_unanswered'])} "
            f"| {_cell(phase['online_min'])}-{_cell(phase['online_max'])} "
            f"| {_cell(phase['disconnects'])} | {_cell(phase['server_cpu_percent'], ' %')} "
            f"| {_cell(phase.get('generator_cpu_percent'), ' %')} "
            f"| {_readyz(phase['readyz'])} |"
        )
    share = verdicts.get("overload_sent_share")
    lines += [
        "",
        "Verdicts: every pile held through overload and recovery "
        f"{_yes(verdicts['all_piles_held'])}; "
        f"heartbeat p99 back under {_cell(result['settings']['rtt_limit_ms'])} ms (held "
        f"{_cell(result['settings']['rtt_hold_s'])} s) "
        + (
            "never during the recovery"
            if verdicts["rtt_recovered_after_s"] is None
            else f"{_cell(verdicts['rtt_recovered_after_s'], ' s')} after the drop to 50 %"
        )
        + f", within 30 s {_yes(verdicts['recovered_within_30s'])}. "
        f"The piles sent {_cell(share)}x the capacity "
        "during the overload"
        + (
            "."
            if verdicts.get("overload_reached") is not False
            else ": **not an overload** (the piles could not send 150 %; use more piles)."
        )
        + ("" if result["completed"] else " **The profile did not complete.**"),
    ]
    curve = _curve(result["timeline"])
    if curve:
        lines += [
            "",
            "Worst 1-s heartbeat p99 of every 5 s, ms, overload then recovery: " + curve + ".",
        ]
    during = phases.get("overload") or {}
    moved = [
        f"`{name}` {_cell(v['first'])} -> {_cell(v['last'])} (max {_cell(v['max'])})"
        for name, v in (during.get("server_metrics") or {}).items()
        if not name.startswith("chargegw_event_loop_lag_seconds")
        and (v["max"] != v["first"] or v["last"] != v["first"])
    ]
    if during.get("event_loop_lag_ms_max") is not None:
        moved.append(f"event-loop lag up to {_cell(during['event_loop_lag_ms_max'])} ms")
    if moved:
        lines += ["", "Server metrics over the overload: " + "; ".join(moved) + "."]
    return lines


def _curve(timeline: list[dict[str, Any]]) -> str:
    """The worst 1-s p99 of every 5 s of overload and recovery, the drop marked."""
    out: list[str] = []
    for phase in ("overload", "recovery"):
        p99s = [e["rtt_p99_ms"] for e in timeline if e["phase"] == phase]
        if not p99s:
            continue
        blocks = [p99s[i : i + 5] for i in range(0, len(p99s), 5)]
        worst = [max((v for v in b if v is not None), default=None) for b in blocks]
        out.append(("" if phase == "overload" else "| 50 %: ") + " ".join(map(_cell, worst)))
    return " ".join(out)


def render_overload(report: dict[str, Any]) -> str:
    """The markdown section (without the markers) for a report of ``--profile overload``."""
    machine, versions = report["machine"], report["versions"]
    lines = [
        "## Overload (`nox -s load -- overload`)",
        "",
        f"Measured {report['date']} on {machine['cpu_model']} ({machine['cores']} logical "
        f"CPUs, {machine['memory_gib']} GiB), {machine['system']}, Python "
        f"{versions['python']}, uvloop {versions.get('uvloop')}, PostgreSQL "
        f"{versions.get('postgresql') or '-'}. The load generator and PostgreSQL run on the "
        "same cores. Command:",
        "",
        "```",
        report["command"],
        "```",
    ]
    for kind, run in report["runs"].items():
        if run.get("overload"):
            lines += ["", *_overload_run(kind, run)]
    lines += [
        "",
        "How to read it: docs/loadtest.md (the overload profile). Offered: what the rate "
        "asks for; sent and answered: frames counted by the piles; p50 / p99 over the phase, "
        "worst 1-s p99 of its seconds.",
    ]
    return "\n".join(lines)


def update_section(path: str | Path, report: dict[str, Any]) -> None:
    """Replace (or append) the marked load-test section of ``path``; for a run of the
    overload profile, its own section instead."""
    if (report.get("options") or {}).get("profile") == "overload":
        target = Path(path)
        text = target.read_text() if target.exists() else ""
        if OVERLOAD_BEGIN not in text and END in text:  # place it after the load test
            target.write_text(text.replace(END, f"{END}\n\n{OVERLOAD_BEGIN}\n{OVERLOAD_END}", 1))
        write_section(path, OVERLOAD_BEGIN, OVERLOAD_END, render_overload(report))
        return
    write_section(path, BEGIN, END, render(report))


def write_section(path: str | Path, begin: str, end: str, body: str) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of ``path`` with
    ``body`` (or append the markers and ``body``)."""
    target = Path(path)
    text = target.read_text() if target.exists() else ""
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    target.write_text(text)
