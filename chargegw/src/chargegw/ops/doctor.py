"""``chargegw doctor``: what a node needs, checked with the node's own settings.

Each check ends ``ok``, ``warn`` (works, but not as production needs it) or ``fail``
(the gateway will not run as configured, or will lose data), with what was found and,
unless ``ok``, the fix. The checks:

- ``open-files``: the open-file limit of this process (what ``chargegw serve`` started
  from the same place gets; the gateway raises its soft limit to the hard one) against
  ``max_connections`` plus the files a worker needs besides (:func:`files_needed`); a
  running gateway's own limit too, when one holds the device port;
- ``device-port`` / ``http-port``: free to bind, or held by a running chargegw (then
  that is fine and named), or held by another program (named when this user may see it);
- ``postgresql``: reachable and its version; ``pg-connections``: PostgreSQL's
  ``max_connections`` against the connections the node's workers open;
  ``pg-durability``: ``fsync``, ``full_page_writes`` and ``synchronous_commit`` on (a
  settlement is acknowledged to the pile only after its commit); ``pg-wal``:
  ``wal_level`` and ``archive_mode`` (point-in-time recovery); ``pg-autovacuum``;
  ``pg-memory``: ``shared_buffers``;
- ``clock``: this machine's clock against the database's;
- ``disk``: free space where the data lives (the embedded PostgreSQL's ``data_dir``, or
  the data directory and tablespaces of a PostgreSQL on this machine), against the
  audit partitions' daily growth;
- ``migrations``: every migration of this code applied, none the code does not know.

With no DSN (the embedded PostgreSQL), doctor connects to the embedded server if it is
running; it never creates one, and starts an existing one only when asked
(``start_embedded=True``, ``--start-embedded``): the server then stops again when doctor
exits, unless a gateway uses it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import errno
import itertools
import os
import resource
import shutil
import time
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

import asyncpg

from chargegw.config import Settings, env_var, mask_dsn
from chargegw.net.transport import FD_RESERVE, bound_socket
from chargegw.store.database import applied_migrations, migrations, start_embedded

__all__ = [
    "DB_CONNECTIONS_BESIDES_POOL",
    "MIN_DEVICE_CONNECTIONS",
    "MIN_SERVER_VERSION",
    "Check",
    "Report",
    "Status",
    "files_needed",
    "run_checks",
]

#: the oldest PostgreSQL the migrations run on
MIN_SERVER_VERSION: Final = 13
#: end of community support of each major version (postgresql.org/support/versioning)
_END_OF_LIFE: Final = {
    13: dt.date(2025, 11, 13),
    14: dt.date(2026, 11, 12),
    15: dt.date(2027, 11, 11),
    16: dt.date(2028, 11, 9),
    17: dt.date(2029, 11, 8),
    18: dt.date(2030, 11, 14),
}
#: database connections one worker opens besides its pool (``db_pool_size``): the cluster
#: directory's own pool (2) and three LISTEN connections (cluster, API keys, events)
DB_CONNECTIONS_BESIDES_POOL: Final = 5
#: connections kept free for the command-line tools (migrate, backup, doctor) and psql
DB_CONNECTIONS_TOOLS: Final = 5
#: with ``max_connections`` 0, fewer device connections than this per worker is a failure
MIN_DEVICE_CONNECTIONS: Final = 1024
#: clock offset against the database: above the first a warning, above the second a failure
CLOCK_WARN_S: Final = 1.0
CLOCK_FAIL_S: Final = 30.0
#: free disk: below these fractions or sizes a failure / a warning
DISK_FAIL_FRACTION: Final = 0.05
DISK_WARN_FRACTION: Final = 0.15
DISK_FAIL_BYTES: Final = 1 << 30
DISK_WARN_BYTES: Final = 10 << 30
#: free disk for fewer days of audit growth than these: a failure / a warning
DISK_FAIL_DAYS: Final = 2.0
DISK_WARN_DAYS: Final = 14.0
#: PostgreSQL's default shared_buffers; at or below it is a warning
SHARED_BUFFERS_DEFAULT: Final = 128 << 20
_CONNECT_TIMEOUT_S: Final = 5.0


class Status(StrEnum):
    """How a check ended; ordered ok < warn < fail."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"

    @property
    def rank(self) -> int:
        return ("ok", "warn", "fail").index(self.value)


@dataclasses.dataclass(frozen=True)
class Check:
    """One check's outcome: what was found (``detail``) and, unless ok, what to do."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "check": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclasses.dataclass(frozen=True)
class Report:
    """Every check of one run, in order."""

    checks: tuple[Check, ...]

    @property
    def status(self) -> Status:
        """The worst status of all checks."""
        return max((c.status for c in self.checks), key=lambda s: s.rank, default=Status.OK)

    @property
    def exit_status(self) -> int:
        """1 if a check failed, else 0."""
        return 1 if self.status is Status.FAIL else 0

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "checks": [c.as_dict() for c in self.checks]}

    def lines(self) -> list[str]:
        """``status  check  detail  [fix: ...]`` per check, the columns aligned."""
        width = max((len(c.name) for c in self.checks), default=0)
        out = []
        for c in self.checks:
            line = f"{c.status.value:<4}  {c.name:<{width}}  {c.detail}"
            if c.fix:
                line += f"  fix: {c.fix}"
            out.append(line)
        return out


def files_needed(settings: Settings) -> int:
    """Open files one worker needs for ``max_connections`` device connections: those,
    ``FD_RESERVE`` (database connections, listening sockets, HTTP clients, logs: what the
    gateway keeps free below its limit) and one socket per webhook attempt in flight."""
    return settings.max_connections + FD_RESERVE + settings.webhooks_max_in_flight


_NOFILE_FIX = (
    "raise the open-file limit: LimitNOFILE={n} in the systemd unit "
    "(deploy/systemd/chargegw.service), `ulimit -n {n}` in the shell that starts chargegw, "
    "or --ulimit nofile={n}:{n} for a container"
)


def _nofile_hard() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = 1 << 20  # as net.transport.connection_limit counts an unlimited one
    return (
        unlimited if soft == resource.RLIM_INFINITY else soft,
        unlimited if hard == resource.RLIM_INFINITY else hard,
    )


def _process_nofile(pid: int) -> int | None:
    """The hard open-file limit of process ``pid`` (from /proc), None if unknown."""
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Max open files"):
            hard = line.split()[4]
            return 1 << 20 if hard == "unlimited" else int(hard)
    return None


def check_open_files(settings: Settings, gateway_pids: Iterable[int] = ()) -> Check:
    """The open-file limit against what ``max_connections`` needs (per process: every
    worker has the limit to itself)."""
    soft, hard = _nofile_hard()
    raised = f" (soft {soft}, raised to the hard limit at start)" if soft < hard else ""
    needed = files_needed(settings)
    limits = {pid: limit for pid in gateway_pids if (limit := _process_nofile(pid)) is not None}
    running = ""
    if limits:
        pids = ", ".join(map(str, limits))
        lowest = min(limits.values())
        running = f"; the running gateway (pid {pids}) has {lowest}"
        hard = min(hard, lowest)
    if settings.max_connections == 0:
        allowed = hard - FD_RESERVE
        detail = (
            f"limit {hard}{raised}{running}: max_connections 0 takes {max(allowed, 0)} "
            "device connections per worker"
        )
        if allowed < MIN_DEVICE_CONNECTIONS:
            return Check(
                "open-files",
                Status.FAIL,
                detail + f", fewer than {MIN_DEVICE_CONNECTIONS}",
                _NOFILE_FIX.format(n=MIN_DEVICE_CONNECTIONS + needed),
            )
        return Check(
            "open-files",
            Status.WARN,
            detail + ", leaving no files for webhook attempts in flight",
            f"set max_connections ({env_var('max_connections')}) to the connections you "
            f"plan per worker, at most {hard - needed} with this limit",
        )
    detail = (
        f"limit {hard}{raised}{running}; max_connections {settings.max_connections} "
        f"needs {needed} per worker"
    )
    if hard < needed:
        fix = _NOFILE_FIX.format(n=needed)
        fits = hard - (needed - settings.max_connections)
        if fits > 0:
            fix += f"; or lower max_connections to {fits}"
        return Check("open-files", Status.FAIL, detail, fix)
    return Check("open-files", Status.OK, detail)


# ---------------------------------------------------------------- ports


@dataclasses.dataclass(frozen=True)
class PortHolder:
    """A process listening on a port; ``is_chargegw``: a ``chargegw serve`` or one of its
    workers."""

    pid: int
    command: str
    is_chargegw: bool


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses
    return int(stat.rsplit(")", 1)[1].split()[1])


def _serves_chargegw(argv: list[str]) -> bool:
    """``chargegw ... serve`` or ``python -m chargegw ... serve``."""
    if "serve" not in argv:
        return False
    if any(Path(arg).name == "chargegw" for arg in argv[:2]):
        return True
    return any(a == "-m" and b == "chargegw" for a, b in itertools.pairwise(argv))


def _is_chargegw(pid: int) -> bool:
    """Process ``pid`` is a ``chargegw serve``, or a worker it spawned (a worker's command
    line is multiprocessing's, its parent the supervisor)."""
    argv = _argv(pid)
    if _serves_chargegw(argv):
        return True
    parent = _parent(pid)
    spawned = any("multiprocessing" in arg for arg in argv)
    return spawned and parent is not None and _serves_chargegw(_argv(parent))


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_holders(port: int) -> list[PortHolder]:
    """The processes listening on TCP ``port`` that this user may see (all, as root)."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in wanted:
                pid = int(proc.name)
                command = " ".join(_argv(pid)) or "?"
                found.append(PortHolder(pid, command, _is_chargegw(pid)))
                break
    return found


def check_port(settings: Settings, what: str, host_name: str, port_name: str) -> Check:
    """Whether the port can be bound; who holds it if not."""
    host, port = getattr(settings, host_name), getattr(settings, port_name)
    name = f"{what}-port"
    change = f"choose another port with {env_var(port_name)}"
    if port == 0:
        return Check(name, Status.OK, "0: any free port, chosen at start")
    try:
        # without SO_REUSEPORT: a running gateway's listener makes this fail too
        bound_socket(host, port, reuse_port=False).close()
    except OSError as exc:
        if exc.errno == errno.EACCES:
            return Check(
                name,
                Status.FAIL,
                f"{host}:{port}: no permission to listen (ports below 1024 need privileges)",
                f"{change}, or give the service AmbientCapabilities=CAP_NET_BIND_SERVICE",
            )
        if exc.errno != errno.EADDRINUSE:
            return Check(
                name,
                Status.FAIL,
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                f"check {env_var(host_name)}",
            )
    else:
        return Check(name, Status.OK, f"{host}:{port} is free")
    holders = port_holders(port)
    if holders and all(h.is_chargegw for h in holders):
        pids = ", ".join(str(h.pid) for h in holders)
        return Check(name, Status.OK, f"{host}:{port} is in use by a running chargegw (pid {pids})")
    others = [h for h in holders if not h.is_chargegw]
    if others:
        who = "; ".join(f"pid {h.pid}: {h.command[:80]}" for h in others)
        return Check(
            name,
            Status.FAIL,
            f"{host}:{port} is in use by another program ({who})",
            f"stop that program or {change}",
        )
    return Check(
        name,
        Status.FAIL,
        f"{host}:{port} is in use by a program this user cannot see",
        f"find it with `sudo ss -ltnp 'sport = :{port}'`; stop it or {change}",
    )


# ---------------------------------------------------------------- the database


def _embedded_dsn(data_dir: str) -> tuple[str | None, str]:
    """The DSN of the embedded PostgreSQL in ``data_dir`` if it runs, else (None, why)."""
    pgdata = Path(data_dir).resolve() / "postgres"
    if not (pgdata / "PG_VERSION").is_file():
        return None, f"no embedded PostgreSQL in {pgdata} yet (`chargegw serve` creates it)"
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        lines = []
    if len(lines) >= 8 and lines[0].strip().isdigit():
        pid, port, socket_dir = int(lines[0]), lines[3].strip(), lines[4].strip()
        status = lines[7].strip()
        try:
            os.kill(pid, 0)
            alive = True
        except PermissionError:
            alive = True
        except OSError:
            alive = False
        if alive and status == "ready" and port.isdigit() and socket_dir:
            return f"postgresql://postgres@/postgres?host={quote(socket_dir)}&port={port}", ""
    return None, f"the embedded PostgreSQL in {pgdata} is not running"


def _connect_fix(exc: BaseException) -> str:
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return f"check the user and password in {env_var('dsn')} (and pg_hba.conf)"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return "create the database (createdb, or CREATE DATABASE) or fix its name in the DSN"
    return (
        f"start PostgreSQL, or check host and port in {env_var('dsn')}, and that this machine "
        "may connect (listen_addresses, pg_hba.conf, firewalls)"
    )


async def _connect(dsn: str) -> asyncpg.Connection[Any]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, timeout=_CONNECT_TIMEOUT_S)
    return conn


def _version_check(version_num: int, version: str, today: dt.date) -> Check:
    major = version_num // 10000
    if major < MIN_SERVER_VERSION:
        return Check(
            "postgresql",
            Status.FAIL,
            f"PostgreSQL {version}: the migrations need {MIN_SERVER_VERSION} or newer",
            f"upgrade PostgreSQL to {MIN_SERVER_VERSION} or newer (pg_upgrade)",
        )
    end = _END_OF_LIFE.get(major)
    if end is not None and end <= today:
        return Check(
            "postgresql",
            Status.WARN,
            f"PostgreSQL {version}, reachable; out of community support since {end}",
            "plan an upgrade to a supported major version (pg_upgrade)",
        )
    return Check("postgresql", Status.OK, f"PostgreSQL {version}, reachable")


async def _settings_of(conn: asyncpg.Connection[Any]) -> dict[str, str]:
    rows = await conn.fetch(
        """SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])""",
        [
            "max_connections",
            "superuser_reserved_connections",
            "reserved_connections",
            "fsync",
            "full_page_writes",
            "synchronous_commit",
            "wal_level",
            "archive_mode",
            "autovacuum",
        ],
    )
    return {r["name"]: r["setting"] for r in rows}


def db_connections_per_worker(settings: Settings) -> int:
    """Database connections one worker process opens at most."""
    return settings.db_pool_size + DB_CONNECTIONS_BESIDES_POOL


async def _connection_check(
    conn: asyncpg.Connection[Any], pg: dict[str, str], workers: int, per_worker: int
) -> Check:
    limit = int(pg["max_connections"])
    reserved = int(pg.get("superuser_reserved_connections", "0")) + int(
        pg.get("reserved_connections", "0")
    )
    available = limit - reserved
    needed = workers * per_worker + DB_CONNECTIONS_TOOLS
    in_use = int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
    )
    detail = (
        f"max_connections {limit} ({available} for ordinary users, {in_use} in use now); "
        f"this node's {workers} worker(s) open up to {workers * per_worker}, "
        f"plus {DB_CONNECTIONS_TOOLS} for tools"
    )
    if needed > available:
        return Check(
            "pg-connections",
            Status.FAIL,
            detail,
            f"raise PostgreSQL's max_connections to at least {needed + reserved} times the "
            "nodes that share it (a restart of PostgreSQL), or run fewer workers or a "
            "smaller db_pool_size",
        )
    return Check("pg-connections", Status.OK, detail + "; every node on it needs as many")


def _durability_check(pg: dict[str, str]) -> Check:
    off = [name for name in ("fsync", "full_page_writes") if pg.get(name) == "off"]
    if pg.get("synchronous_commit") == "off":
        off.append("synchronous_commit")
    if off:
        return Check(
            "pg-durability",
            Status.FAIL,
            f"{', '.join(off)} off: a crash of PostgreSQL loses (or corrupts) transactions "
            "already acknowledged, settlements ACKed to the piles among them",
            "; ".join(f"ALTER SYSTEM SET {name} = on" for name in off)
            + "; SELECT pg_reload_conf()",
        )
    return Check(
        "pg-durability",
        Status.OK,
        f"fsync on, full_page_writes on, synchronous_commit {pg.get('synchronous_commit')}",
    )


def _wal_check(pg: dict[str, str]) -> Check:
    level, archive = pg.get("wal_level", "?"), pg.get("archive_mode", "?")
    detail = f"wal_level {level}, archive_mode {archive}"
    if level == "minimal":
        return Check(
            "pg-wal",
            Status.WARN,
            detail + ": no WAL archiving, point-in-time recovery or standby possible",
            "set wal_level = replica and archive WAL (docs/operations.md); a restart of PostgreSQL",
        )
    if archive == "off":
        return Check(
            "pg-wal",
            Status.WARN,
            detail + ": no point-in-time recovery; a lost disk loses what came after the "
            "last backup",
            "archive WAL (archive_mode = on, archive_command or a tool such as pgBackRest; "
            "docs/operations.md)",
        )
    return Check("pg-wal", Status.OK, detail)


def _autovacuum_check(pg: dict[str, str]) -> Check:
    # a warning, not a failure: nothing breaks at once (and PostgreSQL still vacuums
    # against transaction id wraparound), but the hot tables slow down week by week
    if pg.get("autovacuum") == "off":
        return Check(
            "pg-autovacuum",
            Status.WARN,
            "autovacuum off: the device, port and command tables the gateway updates all "
            "the time bloat and slow down",
            "ALTER SYSTEM SET autovacuum = on; SELECT pg_reload_conf()",
        )
    return Check("pg-autovacuum", Status.OK, "autovacuum on")


async def _memory_check(conn: asyncpg.Connection[Any]) -> Check:
    size = int(await conn.fetchval("SELECT pg_size_bytes(current_setting('shared_buffers'))"))
    shown = await conn.fetchval("SELECT current_setting('shared_buffers')")
    if size <= SHARED_BUFFERS_DEFAULT:
        return Check(
            "pg-memory",
            Status.WARN,
            f"shared_buffers {shown}: PostgreSQL's default, small for a platform database",
            "set shared_buffers to about a quarter of the database machine's memory "
            "(a restart of PostgreSQL)",
        )
    return Check("pg-memory", Status.OK, f"shared_buffers {shown}")


async def _clock_check(conn: asyncpg.Connection[Any]) -> Check:
    before = time.time()
    db_now = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
    after = time.time()
    offset = db_now - (before + after) / 2
    error = (after - before) / 2
    side = "behind" if offset > 0 else "ahead of"
    detail = f"this machine's clock is {abs(offset):.3f} s {side} the database's (+-{error:.3f} s)"
    fix = (
        "synchronise the clocks of this machine and the database's with NTP "
        "(chrony or systemd-timesyncd); BKV devices take their time from the gateway"
    )
    if abs(offset) - error > CLOCK_FAIL_S:
        return Check("clock", Status.FAIL, detail, fix)
    if abs(offset) - error > CLOCK_WARN_S:
        return Check("clock", Status.WARN, detail, fix)
    return Check("clock", Status.OK, detail)


async def _migrations_check(conn: asyncpg.Connection[Any]) -> Check:
    code = {m.version: m.name for m in migrations()}
    newest = max(code.values())
    applied = await applied_migrations(conn)
    if applied is None:
        return Check(
            "migrations",
            Status.FAIL,
            f"no migrations applied (this code has {len(code)}, up to {newest})",
            "chargegw migrate (chargegw serve also applies them at start)",
        )
    unknown = [applied[v] for v in sorted(applied) if v not in code]
    missing = [code[v] for v in sorted(code) if v not in applied]
    if unknown:
        return Check(
            "migrations",
            Status.FAIL,
            f"the database has {len(unknown)} migration(s) this chargegw does not know "
            f"({', '.join(unknown)}): a newer chargegw migrated it",
            "run the chargegw version that migrated this database, or a newer one",
        )
    if missing:
        return Check(
            "migrations",
            Status.FAIL,
            f"{len(missing)} of {len(code)} migration(s) not applied ({', '.join(missing)})",
            "chargegw migrate (chargegw serve also applies them at start)",
        )
    return Check("migrations", Status.OK, f"all {len(code)} applied (up to {newest})")


# ---------------------------------------------------------------- disk


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (a data directory not created yet)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def disk_check(paths: Iterable[tuple[str, Path]], daily_growth: int | None) -> list[Check]:
    """Free space of the file systems holding ``paths`` ((what, path) pairs; one check per
    file system), against fixed floors and ``daily_growth`` bytes of audit a day."""
    checks: list[Check] = []
    seen: dict[int, str] = {}
    for what, path in paths:
        where = _existing(path)
        try:
            device = where.stat().st_dev
            usage = shutil.disk_usage(where)
        except OSError as exc:
            checks.append(
                Check(
                    "disk",
                    Status.WARN,
                    f"{what} {path}: cannot look: {exc.strerror or exc}",
                    "run doctor as the user the gateway runs as, or check the permissions",
                )
            )
            continue
        if device in seen:
            continue
        seen[device] = what
        free, fraction = usage.free, usage.free / usage.total if usage.total else 0.0
        total = _human(usage.total)
        detail = f"{what} {path.resolve()}: {_human(free)} free ({fraction:.0%} of {total})"
        days = None
        if daily_growth:
            days = free / daily_growth
            detail += f"; audit partitions grow about {_human(daily_growth)}/day: {days:.0f} days"
        fix = (
            "free or add disk space, or keep fewer days of audit (audit_retention_days) "
            "and events (events_retention_days)"
        )
        if (
            fraction < DISK_FAIL_FRACTION
            or free < DISK_FAIL_BYTES
            or (days is not None and days < DISK_FAIL_DAYS)
        ):
            checks.append(Check("disk", Status.FAIL, detail, fix))
        elif (
            fraction < DISK_WARN_FRACTION
            or free < DISK_WARN_BYTES
            or (days is not None and days < DISK_WARN_DAYS)
        ):
            checks.append(Check("disk", Status.WARN, detail, fix))
        else:
            checks.append(Check("disk", Status.OK, detail))
    return checks


async def _daily_audit_bytes(conn: asyncpg.Connection[Any]) -> int | None:
    """The largest of the last three complete days' audit partitions, in bytes."""
    today = dt.datetime.now(dt.UTC).date()
    names = [f"frames_{today - dt.timedelta(days=n):%Y%m%d}" for n in (1, 2, 3)]
    size = await conn.fetchval(
        """SELECT max(pg_total_relation_size(c.oid)) FROM pg_class c
           WHERE c.relname = ANY($1::text[]) AND c.relkind = 'r'""",
        names,
    )
    return int(size) if size else None


def _is_local(dsn: str) -> bool:
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    if "host=" in parts.query:
        host = parts.query.split("host=", 1)[1].split("&", 1)[0]
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith(("/", "%2F"))


async def _database_paths(conn: asyncpg.Connection[Any], dsn: str) -> list[tuple[str, Path]]:
    """The data directory and tablespaces of a PostgreSQL on this machine (empty if it
    runs elsewhere, or this user may not read its settings)."""
    if not _is_local(dsn):
        return []
    try:
        data = await conn.fetchval("SELECT current_setting('data_directory')")
        spaces = await conn.fetch(
            "SELECT spcname, pg_tablespace_location(oid) AS location FROM pg_tablespace"
        )
    except asyncpg.InsufficientPrivilegeError:
        return []
    paths = [("PostgreSQL data directory", Path(data))]
    paths += [(f"tablespace {r['spcname']}", Path(r["location"])) for r in spaces if r["location"]]
    return [(what, path) for what, path in paths if path.exists()]


# ---------------------------------------------------------------- all of it


async def _database_checks(
    dsn: str, settings: Settings, extra_paths: list[tuple[str, Path]]
) -> list[Check]:
    try:
        conn = await _connect(dsn)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc) or type(exc).__name__
        return [
            Check(
                "postgresql",
                Status.FAIL,
                f"cannot connect to {mask_dsn(dsn)}: {reason}",
                _connect_fix(exc),
            ),
            *disk_check(extra_paths, None),
        ]
    try:
        version_num = int(await conn.fetchval("SELECT current_setting('server_version_num')"))
        version = str(await conn.fetchval("SELECT current_setting('server_version')"))
        pg = await _settings_of(conn)
        checks = [
            _version_check(version_num, version, dt.datetime.now(dt.UTC).date()),
            await _connection_check(
                conn, pg, settings.workers, db_connections_per_worker(settings)
            ),
            _durability_check(pg),
            _wal_check(pg),
            _autovacuum_check(pg),
            await _memory_check(conn),
            await _clock_check(conn),
        ]
        paths = extra_paths + await _database_paths(conn, dsn)
        growth = None
        if await conn.fetchval("SELECT to_regclass('frames') IS NOT NULL"):
            growth = await _daily_audit_bytes(conn)
        checks += disk_check(paths, growth)
        checks.append(await _migrations_check(conn))
        return checks
    finally:
        await conn.close()


async def run_checks(settings: Settings, *, start_embedded_server: bool = False) -> Report:
    """Every check for a node with ``settings`` (see the module's docstring)."""
    checks = [
        check_port(settings, "device", "device_host", "device_port"),
        check_port(settings, "http", "http_host", "http_port"),
    ]
    gateway_pids = {
        holder.pid
        for port in (settings.device_port, settings.http_port)
        if port
        for holder in port_holders(port)
        if holder.is_chargegw
    }
    checks.insert(0, check_open_files(settings, sorted(gateway_pids)))
    dsn = settings.dsn
    extra: list[tuple[str, Path]] = []
    if not dsn:
        extra = [("data_dir", Path(settings.data_dir))]
        if start_embedded_server:
            try:
                dsn = await asyncio.to_thread(start_embedded, settings.data_dir)
            except Exception as exc:
                checks.append(
                    Check(
                        "postgresql",
                        Status.FAIL,
                        f"cannot start the embedded PostgreSQL in {settings.data_dir}: {exc}",
                        f"see {Path(settings.data_dir) / 'postgres' / 'log'}",
                    )
                )
                checks += disk_check(extra, None)
                return Report(tuple(checks))
        else:
            found, why = _embedded_dsn(settings.data_dir)
            if found is None:
                checks.append(
                    Check(
                        "postgresql",
                        Status.WARN,
                        f"no DSN; {why}: the database checks were skipped",
                        "run `chargegw doctor --start-embedded`, or set "
                        f"{env_var('dsn')} (recommended in production)",
                    )
                )
                checks += disk_check(extra, None)
                return Report(tuple(checks))
            dsn = found
    checks += await _database_checks(dsn, settings, extra)
    return Report(tuple(checks))
