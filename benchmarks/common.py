"""Measuring helpers shared by the codec benchmarks."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import timeit
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import construct

#: one measured frame: ``case`` (its label), the timings and ratios, extra columns
Row = dict[str, object]

#: the table columns after the frame's own: (heading, row key)
TIMING_COLUMNS = [
    ("decode us", "decode_us"),
    ("hand us", "hand_decode_us"),
    ("ratio", "decode_ratio"),
    ("encode us", "encode_us"),
    ("hand us", "hand_encode_us"),
    ("ratio", "encode_ratio"),
    ("construct compiled us", "construct_compiled_us"),
    ("construct interpreted us", "construct_interpreted_us"),
]


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Microseconds per call, best of ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def paired_best_us(
    ours: Callable[[], object], hand: Callable[[], object], number: int, repeat: int
) -> tuple[float, float]:
    """Best of ``repeat`` runs of each, the two interleaved run by run, so that a busy
    moment of a shared machine slows both sides of a ratio alike."""
    timers = (timeit.Timer(ours), timeit.Timer(hand))
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.timeit(number))
    return best[0] / number * 1e6, best[1] / number * 1e6


def machine_name() -> str:
    """CPU model (from /proc/cpuinfo where there is one), core count, OS, architecture."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    system = f"{platform.system()} {platform.machine()}"
    return f"{model or 'unknown CPU'} ({cores} logical CPUs), {system}"


def commit_id(root: Path | None = None) -> str:
    """The commit checked out in ``root`` (default: this repository), read from ``.git``
    without running git; "unknown" if there is none. Uncommitted changes are not seen."""
    git = (root or Path(__file__).resolve().parent.parent) / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # detached
        ref = head[len("ref: ") :]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError):
        pass
    return "unknown"


def write_section(path: Path, section: str) -> None:
    """Replace the ``## ...`` section of ``path`` that ``section`` starts with (or append it)."""
    heading = section.split("\n", 1)[0]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start >= 0:
        # up to the next heading or section marker (``<!-- load:begin -->`` ...)
        ends = [
            i for i in (text.find("\n## ", start + 1), text.find("\n<!--", start + 1)) if i >= 0
        ]
        end = min(ends) if ends else -1
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text)


def measure_codec(
    label: str,
    frame: bytes,
    decode: Callable[[bytes], Any],
    encode: Callable[[Any], bytes],
    hand_decode: Callable[[bytes], Any],
    hand_encode: Callable[[Any], bytes],
    number: int,
    repeat: int,
) -> tuple[Any, Row]:
    """Check that our codec and the hand-written one agree on ``frame``, then time
    decode and encode against it (paired). Returns the decoded message and the row."""
    ours = decode(frame)
    assert hand_decode(frame) == ours, label
    assert hand_encode(ours) == frame == encode(ours), label
    decode_ours, decode_hand = paired_best_us(
        partial(decode, frame), partial(hand_decode, frame), number, repeat
    )
    encode_ours, encode_hand = paired_best_us(
        partial(encode, ours), partial(hand_encode, ours), number, repeat
    )
    return ours, {
        "case": label,
        "decode_us": decode_ours,
        "hand_decode_us": decode_hand,
        "decode_ratio": decode_ours / decode_hand,
        "encode_us": encode_ours,
        "hand_encode_us": encode_hand,
        "encode_ratio": encode_ours / encode_hand,
    }


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key.endswith("_ratio"):
        return f"**{value:.2f}x**"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_section(
    title: str, method: Sequence[str], columns: Sequence[tuple[str, str]], rows: Sequence[Row]
) -> str:
    """The ``## title`` section: when and where it was measured, ``method`` (the lines
    that finish "The hand-written decoder checks"), the table, the target."""
    when = datetime.date.today().isoformat()
    machine = f"{machine_name()}, Python {platform.python_version()}"
    out = [
        f"## {title}",
        "",
        f"Measured {when} on {machine} ({construct.version_string} for the construct columns),",
        "`nox -s bench`. Microseconds per frame, best of the timing runs; a ratio compares",
        "two figures of the same run, timed interleaved. The hand-written decoder checks",
        *method,
        "",
        "| " + " | ".join(heading for heading, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        out.append("| " + " | ".join(_cell(key, r[key]) for _, key in columns) + " |")
    out += ["", "Target: decode and encode within 3x of the hand-written code.", ""]
    return "\n".join(out)


def bench_main(
    doc: str | None,
    run: Callable[[int, int], list[Row]],
    markdown: Callable[[list[Row]], str],
    *,
    number: int,
    repeat: int,
) -> None:
    """Command line of a codec benchmark: measure, print the section, ``--write`` it."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--number", type=int, default=number)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--write", type=Path, help="update this markdown file")
    args = parser.parse_args()
    rows = run(args.number, args.repeat)
    section = markdown(rows)
    print(section)
    if args.write:
        write_section(args.write, section)
    worst = max(max(float(r["decode_ratio"]), float(r["encode_ratio"])) for r in rows)  # type: ignore[arg-type]
    print(f"worst ratio {worst:.2f}x (target 3x)")
