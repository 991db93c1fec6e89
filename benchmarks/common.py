"""Measuring helpers shared by the codec benchmarks."""

from __future__ import annotations

import os
import platform
import timeit
from collections.abc import Callable
from pathlib import Path


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


def write_section(path: Path, section: str) -> None:
    """Replace the ``## ...`` section of ``path`` that ``section`` starts with (or append it)."""
    heading = section.split("\n", 1)[0]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text)
