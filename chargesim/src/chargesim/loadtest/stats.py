"""Measuring: latency histograms, percentiles, and process figures from /proc."""

from __future__ import annotations

import bisect
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any, Final

#: histogram bucket edges in milliseconds: 0.05 ms to ~100 s, 5 % apart
_EDGES: Final = tuple(0.05 * 1.05**i for i in range(300))
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024


class Histogram:
    """Counts of values (milliseconds) in logarithmic buckets, 5 % wide.

    Cheap enough to record every heartbeat's round trip; histograms of several
    processes merge by adding their ``counts``.
    """

    __slots__ = ("counts", "max")

    def __init__(self, counts: Sequence[int] | None = None, maximum: float = 0.0) -> None:
        self.counts = list(counts) if counts is not None else [0] * (len(_EDGES) + 1)
        self.max = maximum

    def add(self, value_ms: float) -> None:
        """Record one value."""
        self.counts[bisect.bisect_left(_EDGES, value_ms)] += 1
        self.max = max(self.max, value_ms)

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts to this one."""
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.max = max(self.max, other.max)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def percentile(self, q: float) -> float | None:
        """The upper edge of the bucket holding the ``q``-th percentile (0-100)."""
        total = self.total
        if total == 0:
            return None
        rank = max(1, math.ceil(total * q / 100.0))
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(_EDGES[i] if i < len(_EDGES) else self.max, self.max)
        return self.max

    def summary(self) -> dict[str, Any]:
        """``{"count", "p50", "p99", "max"}`` in milliseconds."""
        return {
            "count": self.total,
            "p50": _round(self.percentile(50)),
            "p99": _round(self.percentile(99)),
            "max": _round(self.max if self.total else None),
        }

    def to_json(self) -> dict[str, Any]:
        """Sparse form for the generators' reports: ``{"buckets": {index: count}, "max"}``."""
        return {"buckets": {str(i): c for i, c in enumerate(self.counts) if c}, "max": self.max}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        """Inverse of :meth:`to_json`."""
        hist = cls(maximum=float(data.get("max", 0.0)))
        for index, count in data.get("buckets", {}).items():
            hist.counts[int(index)] += int(count)
        return hist


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def percentiles(values: Iterable[float]) -> dict[str, Any]:
    """Exact ``{"count", "p50", "p99", "max"}`` of a list (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p99": None, "max": None}

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(len(ordered) * q / 100.0) - 1)]

    return {
        "count": len(ordered),
        "p50": _round(rank(50)),
        "p99": _round(rank(99)),
        "max": _round(ordered[-1]),
    }


# --- /proc -------------------------------------------------------------------------------


def rss_kib(pid: int | str = "self") -> int | None:
    """Resident set size of a process (VmRSS), None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE_KIB
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU time of a process (utime + stime), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command name: state is field 3; utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive, parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    pending = [root]
    while pending:
        pid = pending.pop(0)
        if rss_kib(pid) is None:
            continue
        out.append(pid)
        pending.extend(sorted(children.get(pid, ())))
    return out


def command_name(pid: int) -> str:
    """A short description of a process: its command line, shortened."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        return "?"
    text = " ".join(os.path.basename(parts[0]) if i == 0 else p for i, p in enumerate(parts))
    return text[:160]


def open_files_limit() -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of this process."""
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_open_files_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, kernel and the open-file limits of this machine."""
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_kib = int(line.split()[1])
                    break
    except OSError:
        pass
    soft, hard = open_files_limit()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": None if memory_kib is None else round(memory_kib / 1024**2, 1),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "open_files_limit": {"soft": soft, "hard": hard},
    }


def versions() -> dict[str, str | None]:
    """Versions of Python and of the packages the measurement depends on."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("chargegw", "chargeproto", "uvloop", "asyncpg", "uvicorn", "fastapi"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
