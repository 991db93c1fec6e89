"""``chargegw db stats``: what the platform's tables take on disk and how clean they are.

Per table: total size (heap, indexes, TOAST), live and dead tuples with the dead ratio
(``n_dead_tup / (n_live_tup + n_dead_tup)``, PostgreSQL's estimates from the statistics
collector), when it was last vacuumed and analyzed (by hand or by autovacuum), and its
per-table storage settings (the autovacuum settings of migration 0018). Partitioned
tables are listed with each partition, its range and its size; the parent's figures are
the sums of its partitions.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from chargegw.store.database import Connection

__all__ = [
    "PartitionStats",
    "TableStats",
    "db_stats",
    "human_bytes",
    "render_partitions",
    "render_table",
]


@dataclasses.dataclass
class PartitionStats:
    """One partition of a partitioned table."""

    name: str
    #: its bounds as PostgreSQL states them (``FROM (...) TO (...)``, ``DEFAULT``)
    range: str
    total_bytes: int
    live_tuples: int


@dataclasses.dataclass
class TableStats:
    """One table (for a partitioned one: the sums over its partitions)."""

    name: str
    partitioned: bool
    total_bytes: int
    heap_bytes: int
    index_bytes: int
    toast_bytes: int
    live_tuples: int
    dead_tuples: int
    last_vacuum: datetime | None
    last_autovacuum: datetime | None
    last_analyze: datetime | None
    last_autoanalyze: datetime | None
    #: per-table storage settings (``autovacuum_vacuum_scale_factor=0.02`` ...)
    options: list[str]
    partitions: list[PartitionStats] = dataclasses.field(default_factory=list)

    @property
    def dead_ratio(self) -> float:
        """Dead tuples among all tuples (0 for an empty table)."""
        total = self.live_tuples + self.dead_tuples
        return self.dead_tuples / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dead_ratio"] = round(self.dead_ratio, 4)
        for key in ("last_vacuum", "last_autovacuum", "last_analyze", "last_autoanalyze"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


_QUERY = """
SELECT c.relname, c.relkind::text AS relkind, parent.relname AS parent,
       pg_get_expr(c.relpartbound, c.oid) AS bound,
       pg_total_relation_size(c.oid) AS total, pg_relation_size(c.oid) AS heap,
       pg_indexes_size(c.oid) AS indexes,
       coalesce(s.n_live_tup, 0) AS live, coalesce(s.n_dead_tup, 0) AS dead,
       s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze,
       coalesce(c.reloptions, '{}') AS options
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
  LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
  LEFT JOIN pg_class parent ON parent.oid = i.inhparent
  LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
 WHERE c.relkind IN ('r', 'p')
"""


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return max((x for x in (a, b) if x is not None), default=None)


async def db_stats(conn: Connection) -> dict[str, Any]:
    """The database's size and its tables' figures, biggest table first."""
    rows = await conn.fetch(_QUERY)
    tables: dict[str, TableStats] = {}
    children: list[Any] = []
    for row in rows:
        if row["parent"] is not None:
            children.append(row)
        tables[row["relname"]] = TableStats(
            name=row["relname"],
            partitioned=row["relkind"] == "p",
            total_bytes=row["total"],
            heap_bytes=row["heap"],
            index_bytes=row["indexes"],
            toast_bytes=max(row["total"] - row["heap"] - row["indexes"], 0),
            live_tuples=row["live"],
            dead_tuples=row["dead"],
            last_vacuum=row["last_vacuum"],
            last_autovacuum=row["last_autovacuum"],
            last_analyze=row["last_analyze"],
            last_autoanalyze=row["last_autoanalyze"],
            options=list(row["options"]),
        )
    for row in children:
        parent, child = tables[row["parent"]], tables.pop(row["relname"])
        parent.partitions.append(
            PartitionStats(child.name, _range(row["bound"]), child.total_bytes, child.live_tuples)
        )
        parent.total_bytes += child.total_bytes
        parent.heap_bytes += child.heap_bytes
        parent.index_bytes += child.index_bytes
        parent.toast_bytes += child.toast_bytes
        parent.live_tuples += child.live_tuples
        parent.dead_tuples += child.dead_tuples
        parent.last_vacuum = _latest(parent.last_vacuum, child.last_vacuum)
        parent.last_autovacuum = _latest(parent.last_autovacuum, child.last_autovacuum)
        parent.last_analyze = _latest(parent.last_analyze, child.last_analyze)
        parent.last_autoanalyze = _latest(parent.last_autoanalyze, child.last_autoanalyze)
    for table in tables.values():
        table.partitions.sort(key=lambda p: p.name)
    ordered = sorted(tables.values(), key=lambda t: (-t.total_bytes, t.name))
    return {
        "database": await conn.fetchval("SELECT current_database()"),
        "size_bytes": await conn.fetchval("SELECT pg_database_size(current_database())"),
        "tables": [t.as_dict() for t in ordered],
    }


def _range(bound: str | None) -> str:
    text = bound or ""
    return text.removeprefix("FOR VALUES ").strip() or "-"


def human_bytes(size: int) -> str:
    """``8192`` -> ``8.0 kB`` (powers of 1024, as PostgreSQL's pg_size_pretty)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "never"


def render_table(stats: dict[str, Any]) -> list[list[str]]:
    """The rows of the tables' table (header first); the partitions follow as a second
    table from :func:`render_partitions`."""
    rows = [["TABLE", "TOTAL", "HEAP", "INDEXES", "LIVE", "DEAD", "DEAD%", "VACUUMED", "ANALYZED"]]
    for t in stats["tables"]:
        vacuumed = max(filter(None, (t["last_vacuum"], t["last_autovacuum"])), default=None)
        analyzed = max(filter(None, (t["last_analyze"], t["last_autoanalyze"])), default=None)
        rows.append(
            [
                t["name"] + (f" ({len(t['partitions'])} partitions)" if t["partitioned"] else ""),
                human_bytes(t["total_bytes"]),
                human_bytes(t["heap_bytes"]),
                human_bytes(t["index_bytes"]),
                str(t["live_tuples"]),
                str(t["dead_tuples"]),
                f"{100 * t['dead_ratio']:.1f}",
                _when(vacuumed),
                _when(analyzed),
            ]
        )
    return rows


def render_partitions(stats: dict[str, Any]) -> list[list[str]]:
    """The rows of the partitions' table (header first)."""
    rows = [["PARTITIONED", "PARTITION", "RANGE", "SIZE", "LIVE"]]
    for t in stats["tables"]:
        for p in t["partitions"]:
            rows.append(
                [
                    t["name"],
                    p["name"],
                    p["range"],
                    human_bytes(p["total_bytes"]),
                    str(p["live_tuples"]),
                ]
            )
    return rows
