"""``chargegw backup`` and ``chargegw restore``: a consistent dump of the platform's
database with a manifest, and its restore into an empty database, checked before and
after.

A backup is a directory holding ``chargegw.dump`` (``pg_dump -Fc``: one snapshot) and
``manifest.json``. The row counts in the manifest are taken in the very snapshot the dump
reads: a REPEATABLE READ transaction exports its snapshot (``pg_export_snapshot()``),
counts every table, and pg_dump runs with ``--snapshot`` while that transaction stays
open. Partition maintenance and migrations (both DDL) wait for the backup to end, so no
table the snapshot sees is dropped under pg_dump.

A restore refuses, before it changes anything: a manifest whose schema is newer than this
code's migrations (and a dump whose own ``schema_migrations`` is), a dump whose sha256
differs from the manifest or that pg_restore cannot read, and a target database that is
not empty. It then restores in one transaction (``--single-transaction
--exit-on-error``): a dump that breaks half-way leaves the database as empty as it was.
Afterwards every table is counted against the manifest.

What the restored database says about running processes (the session directory, process
heartbeats, claims of commands and webhook deliveries) is left as it was: it is what a
power loss leaves behind, and the gateway's crash recovery clears it (processes without a
heartbeat are declared stopped after ``process_timeout_s``, their devices released;
claims of commands follow the device's new connection; webhook leases run out). One
thing is not restored: ``device_correlations``, the last message id used per device. Ids
used after the backup are unknown, and reusing the next one could look like a repeat to
the device; without a row, a device's next id starts at random, as for a new device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from chargegw import __version__
from chargegw.causes import RESTORE_RECOVERY, Cause
from chargegw.domain.orders import transition
from chargegw.ops.pgtools import PgTools, ToolsError, find_tools
from chargegw.store.causes import apply as apply_cause
from chargegw.store.database import MIGRATION_LOCK, applied_migrations, migrations
from chargegw.store.partitions import MAINTENANCE_LOCK

__all__ = [
    "DUMP_FILE",
    "MANIFEST_FILE",
    "BackupError",
    "RestoreReport",
    "backup",
    "read_manifest",
    "restore",
]

MANIFEST_FILE = "manifest.json"
DUMP_FILE = "chargegw.dump"
#: the manifest's layout; a newer one is refused
FORMAT = 1
#: tables whose rows are deliberately not restored (see the module's doc)
NOT_RESTORED = ("device_correlations",)
_STDERR_SHOWN = 1500


#: after a restore every id (events, commands, orders, ...) goes on this far past the
#: backup's: the ids issued between the backup and the restore are never given again, so a
#: client resuming from one (``after=``, ``Last-Event-ID``) or deduplicating by it misses
#: nothing
ID_GAP = 1_000_000_000
#: frame ids are ``epoch << 32 | counter`` (store/causes.py): their epoch sequence goes on
#: by this many epochs instead (each gateway start takes one), so that ids stay in a
#: bigint: the sequence ends at 2^31 - 1, room for 2047 restores
EPOCH_GAP = 1 << 20
#: sequences moved by their own gap
_SEQUENCE_GAPS = {"frame_id_epochs": EPOCH_GAP}


#: the dead reason of the commands a restore finishes
RESTORED = "restored"


class BackupError(Exception):
    """A backup or restore cannot be made; the message says why and what to do."""


# ---------------------------------------------------------------- helpers


async def _finish_open_commands(conn: asyncpg.Connection) -> int:
    """Finish the expired commands open at the backup (see :func:`restore`); how many."""
    async with conn.transaction():
        await apply_cause(conn, Cause.system(RESTORE_RECOVERY))
        rows = await conn.fetch(
            """UPDATE commands SET status = 'dead', dead_reason = $1, finished_at = now(),
                                  claimed_by = NULL
               WHERE status IN ('pending', 'sent') AND expires_at < now()
               RETURNING command_id, name, order_no""",
            RESTORED,
        )
        for row in rows:
            if row["order_no"] is not None and row["name"] == "start":
                await transition(conn, row["order_no"], "start_failed", failure_reason=RESTORED)
    return len(rows)


async def _skip_issued_ids(conn: asyncpg.Connection) -> None:
    """Move every sequence, and the event id sequencer, ``ID_GAP`` past the backup's
    (the frame id epochs ``EPOCH_GAP``)."""
    async with conn.transaction():
        for row in await conn.fetch(
            """SELECT format('%I.%I', schemaname, sequencename) AS seq, sequencename AS name,
                      last_value
               FROM pg_sequences WHERE schemaname = current_schema()"""
        ):
            gap = _SEQUENCE_GAPS.get(row["name"], ID_GAP)
            await conn.execute(
                "SELECT setval($1::regclass, $2)", row["seq"], (row["last_value"] or 0) + gap
            )
        if await conn.fetchval("SELECT to_regclass('event_sequencer')") is not None:
            await conn.execute("UPDATE event_sequencer SET last_id = last_id + $1", ID_GAP)


def _libpq(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN for pg_dump/pg_restore without its password (which goes to PGPASSWORD,
    so it never shows in the process list), and the environment to run them with."""
    env = dict(os.environ)
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        return dsn, env
    query = parse_qsl(parts.query, keep_blank_values=True)
    in_query = [value for key, value in query if key == "password"]
    if in_query:  # ?password=... would show in the process list too
        env["PGPASSWORD"] = in_query[-1]
        parts = parts._replace(query=urlencode([(k, v) for k, v in query if k != "password"]))
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)  # asyncpg decodes it: so must we
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}@{netloc[1]}")
    return urlunsplit(parts), env


async def _run(args: Sequence[str | Path], env: dict[str, str]) -> tuple[int, bytes, str]:
    """Run a program; its exit status, stdout and (the end of) stderr."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    text = err.decode(errors="replace").strip()
    if len(text) > _STDERR_SHOWN:
        text = "... " + text[-_STDERR_SHOWN:]
    assert proc.returncode is not None
    return proc.returncode, out, text


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def _connect(dsn: str) -> asyncpg.Connection[Any]:
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, timeout=30)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BackupError(f"cannot connect to PostgreSQL: {exc}") from exc
    return conn


async def _server_major(conn: asyncpg.Connection[Any]) -> tuple[int, str]:
    """The server's major version and its version (``15.4``)."""
    num = int(await conn.fetchval("SELECT current_setting('server_version_num')::int"))
    return num // 10000, str(await conn.fetchval("SELECT current_setting('server_version')"))


def _tools(server_major: int, *, at_least: int = 0, pg_bin: str | Path | None) -> PgTools:
    try:
        return find_tools(server_major, at_least=at_least, pg_bin=pg_bin)
    except ToolsError as exc:
        raise BackupError(str(exc)) from None


def _known_versions() -> list[str]:
    return [m.version for m in migrations()]


def _newer_than_code(versions: Sequence[str]) -> list[str]:
    """The migration versions this code does not have (a newer chargegw wrote them)."""
    known = set(_known_versions())
    return sorted(v for v in versions if v not in known)


async def _user_tables(conn: asyncpg.Connection[Any]) -> list[str]:
    """Every ordinary table of the public schema (partitions included, their parents
    not: a parent holds no rows of its own)."""
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY c.relname"""
    )
    return [r["relname"] for r in rows]


async def _count(conn: asyncpg.Connection[Any], table: str) -> int:
    return int(await conn.fetchval(f'SELECT count(*) FROM public."{table}"'))


async def _partitions(conn: asyncpg.Connection[Any]) -> dict[str, list[str]]:
    rows = await conn.fetch(
        """SELECT p.relname AS parent, c.relname AS child
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             JOIN pg_namespace n ON n.oid = p.relnamespace
            WHERE n.nspname = 'public' AND p.relkind = 'p'
            ORDER BY 1, 2"""
    )
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(row["parent"], []).append(row["child"])
    return out


# ---------------------------------------------------------------- backup


def _prepare_output(output: Path) -> None:
    if output.exists():
        if not output.is_dir():
            raise BackupError(f"{output} exists and is not a directory: name a new directory")
        if any(output.iterdir()):
            raise BackupError(
                f"{output} is not empty: a backup goes into a new or empty directory "
                "(nothing was written)"
            )
    output.mkdir(mode=0o700, parents=True, exist_ok=True)
    output.chmod(0o700)  # the dump holds secrets: webhook secrets, key hashes


async def backup(dsn: str, output: Path, *, pg_bin: str | Path | None = None) -> dict[str, Any]:
    """Dump the database of ``dsn`` into the new directory ``output``; the manifest."""
    output = Path(output)
    started = time.monotonic()
    conn = await _connect(dsn)
    try:
        major, server_version = await _server_major(conn)
        if await applied_migrations(conn) is None:
            raise BackupError(
                "the database has no schema_migrations table: it is not a chargegw database "
                "(check --dsn)"
            )
        tools = _tools(major, pg_bin=pg_bin)
        _prepare_output(output)
        # DDL waits until the dump is done (session locks, released by unlock or close)
        await conn.execute("SELECT pg_advisory_lock_shared($1)", MAINTENANCE_LOCK)
        await conn.execute("SELECT pg_advisory_lock_shared($1)", MIGRATION_LOCK)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            await conn.execute("SET LOCAL statement_timeout = 0")
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            taken_at: datetime = await conn.fetchval("SELECT now()")
            applied = list(await applied_migrations(conn) or {})
            counts = {t: await _count(conn, t) for t in await _user_tables(conn)}
            partitions = await _partitions(conn)
            database = await conn.fetchval("SELECT current_database()")
            dump = output / DUMP_FILE
            target, env = _libpq(dsn)
            status, _, err = await _run(
                [
                    tools.pg_dump,
                    "--format=custom",
                    f"--snapshot={snapshot}",
                    f"--file={dump}",
                    f"--dbname={target}",
                ],
                env,
            )
            if status != 0:
                dump.unlink(missing_ok=True)
                raise BackupError(f"pg_dump failed (exit {status}): {err}")
    finally:
        await conn.close()
    dump.chmod(0o600)
    manifest = {
        "format": FORMAT,
        "created_at": taken_at.isoformat(),
        "gateway_version": __version__,
        "schema_version": applied[-1] if applied else None,
        "migrations": applied,
        "database": database,
        "server_version": server_version,
        "server_major": major,
        "pg_dump_version": tools.version,
        "pg_dump_major": tools.major,
        "dump_file": DUMP_FILE,
        "dump_bytes": dump.stat().st_size,
        "sha256": _sha256(dump),
        "tables": counts,
        "partitions": partitions,
        "duration_s": round(time.monotonic() - started, 3),
    }
    _write_json(output / MANIFEST_FILE, manifest)
    return manifest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole or not at all (a temporary file renamed into place)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- restore


def read_manifest(source: Path) -> tuple[dict[str, Any], Path]:
    """The manifest of the backup ``source`` (its directory or its manifest file) and the
    path of its dump, checked for shape; BackupError when it is not a usable backup."""
    source = Path(source)
    path = source / MANIFEST_FILE if source.is_dir() else source
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(
            f"no {MANIFEST_FILE} in {source}: name a directory written by `chargegw backup`"
        ) from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read the manifest {path}: {exc}") from None
    problems = []
    if not isinstance(manifest, dict):
        raise BackupError(f"the manifest {path} is not a JSON object")
    if manifest.get("format") != FORMAT:
        problems.append(f"format {manifest.get('format')!r} (this chargegw reads {FORMAT})")
    for key, kind in (
        ("migrations", list),
        ("tables", dict),
        ("sha256", str),
        ("dump_file", str),
        ("pg_dump_major", int),
    ):
        if not isinstance(manifest.get(key), kind):
            problems.append(f"{key} missing or not a {kind.__name__}")
    if problems:
        raise BackupError(f"the manifest {path} is not usable: " + "; ".join(problems))
    dump_file = manifest["dump_file"]
    if "/" in dump_file or dump_file in ("", ".", "..") or dump_file.startswith("-"):
        raise BackupError(f"the manifest {path} names a dump outside its directory")
    # absolute: a relative name could reach pg_restore's arguments as an option
    return manifest, path.parent.resolve() / dump_file


def _refuse_newer(versions: Sequence[str], where: str) -> None:
    newer = _newer_than_code(versions)
    if newer:
        latest = _known_versions()[-1]
        raise BackupError(
            f"{where} has schema version {max(newer)} (migrations {', '.join(newer)}), newer "
            f"than this chargegw {__version__} knows (latest {latest}): restore it with the "
            "chargegw version that made it, or a newer one (nothing was changed)"
        )


_COPY = re.compile(r"^COPY public\.schema_migrations \(([^)]*)\) FROM stdin;$")


async def _dump_migrations(tools: PgTools, dump: Path, env: dict[str, str]) -> list[str]:
    """The versions in the dump's own ``schema_migrations`` rows."""
    status, out, err = await _run(
        [tools.pg_restore, "--data-only", "--table=schema_migrations", "--file=-", dump], env
    )
    if status != 0:
        raise BackupError(f"the dump {dump} is corrupt or truncated (pg_restore: {err})")
    versions: list[str] = []
    column: int | None = None
    for line in out.decode(errors="replace").splitlines():
        if column is None:
            match = _COPY.match(line)
            if match:
                column = [c.strip() for c in match.group(1).split(",")].index("version")
        elif line == "\\.":
            break
        else:
            versions.append(line.split("\t")[column])
    if column is None:
        raise BackupError(f"the dump {dump} holds no schema_migrations rows: not a chargegw dump")
    return versions


async def _not_empty(conn: asyncpg.Connection[Any]) -> list[str]:
    """What the database already holds (relations, functions, extensions)."""
    rows = await conn.fetch(
        """WITH mine AS (
               SELECT oid, nspname FROM pg_namespace
                WHERE nspname NOT IN ('pg_catalog', 'information_schema')
                  AND nspname NOT LIKE 'pg\\_toast%' AND nspname NOT LIKE 'pg\\_temp%')
           SELECT 'table ' || m.nspname || '.' || c.relname AS what
             FROM pg_class c JOIN mine m ON m.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
           UNION ALL
           SELECT 'function ' || m.nspname || '.' || p.proname
             FROM pg_proc p JOIN mine m ON m.oid = p.pronamespace
           UNION ALL
           SELECT 'extension ' || extname FROM pg_extension WHERE extname <> 'plpgsql'
           ORDER BY 1 DESC"""
    )
    return [r["what"] for r in rows]


@dataclasses.dataclass
class RestoreReport:
    """What a restore did and found."""

    database: str
    #: table -> (rows in the manifest, rows restored)
    counts: dict[str, tuple[int, int]]
    #: tables whose restored count differs from the manifest (empty: all match)
    mismatched: dict[str, tuple[int, int]]
    #: tables whose rows were deliberately not restored
    not_restored: list[str]
    schema_version: str | None
    pg_restore_version: str
    duration_s: float
    #: commands open at the backup and expired since, finished ``dead`` (``restored``)
    commands_finished: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatched

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "ok": self.ok,
            "schema_version": self.schema_version,
            "tables": {t: {"manifest": m, "restored": r} for t, (m, r) in self.counts.items()},
            "mismatched": sorted(self.mismatched),
            "not_restored": self.not_restored,
            "pg_restore_version": self.pg_restore_version,
            "duration_s": self.duration_s,
            "commands_finished": self.commands_finished,
        }


async def restore(
    source: Path,
    dsn: str,
    *,
    pg_bin: str | Path | None = None,
    keep_open_commands: bool = False,
) -> RestoreReport:
    """Restore the backup ``source`` into the empty database of ``dsn``; every check that
    can refuse runs before anything is written, and the restore is one transaction.

    The commands open at the backup (``pending``, ``sent``) whose ``expires_at`` has
    passed by now are finished ``dead`` with reason ``restored``, their starts' orders
    ``start_failed``: whether a pile answered them after the backup is unknown, and
    sending one again hours later could start a session twice. Those still within their
    expiry go on as they would after a restart. ``keep_open_commands`` leaves them all to
    be delivered."""
    started = time.monotonic()
    manifest, dump = read_manifest(Path(source))
    _refuse_newer(manifest["migrations"], "the backup")
    if not dump.is_file():
        raise BackupError(f"the dump {dump} named by the manifest is missing")
    digest = await asyncio.to_thread(_sha256, dump)
    if digest != manifest["sha256"]:
        raise BackupError(
            f"the dump {dump} does not match its manifest (sha256 {digest}, manifest says "
            f"{manifest['sha256']}): it was changed or damaged after the backup; use another "
            "backup (nothing was changed)"
        )
    conn = await _connect(dsn)
    try:
        major, _ = await _server_major(conn)
        if major < manifest["pg_dump_major"]:
            raise BackupError(
                f"the backup was written by pg_dump {manifest['pg_dump_major']} and the target "
                f"server is PostgreSQL {major}: restore into PostgreSQL "
                f"{manifest['pg_dump_major']} or newer (nothing was changed)"
            )
        tools = _tools(major, at_least=manifest["pg_dump_major"], pg_bin=pg_bin)
        target, env = _libpq(dsn)
        status, listing, err = await _run([tools.pg_restore, "--list", dump], env)
        if status != 0:
            raise BackupError(f"the dump {dump} is corrupt or truncated (pg_restore: {err})")
        _refuse_newer(await _dump_migrations(tools, dump, env), "the dump")
        found = await _not_empty(conn)
        database = str(await conn.fetchval("SELECT current_database()"))
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise BackupError(
                f"refusing to restore into database {database!r}: it is not empty ({shown}); "
                "restore into a new empty database (createdb), or a new --data-dir for the "
                "embedded server (nothing was changed)"
            )
        with tempfile.TemporaryDirectory(prefix="chargegw-restore-") as tmp:
            toc = Path(tmp) / "toc.list"
            toc.write_text(_without_data(listing.decode(errors="replace"), NOT_RESTORED))
            status, _, err = await _run(
                [
                    tools.pg_restore,
                    "--single-transaction",
                    "--exit-on-error",
                    "--no-owner",
                    "--no-privileges",
                    f"--use-list={toc}",
                    f"--dbname={target}",
                    dump,
                ],
                env,
            )
        if status != 0:
            left = await _not_empty(conn)
            state = (
                "nothing was restored (one transaction)"
                if not left
                else f"the database now holds {len(left)} objects: drop it and create it anew"
            )
            raise BackupError(f"pg_restore failed (exit {status}), {state}: {err}")
        await conn.execute("ANALYZE")  # pg_restore brings no planner statistics
        counts: dict[str, tuple[int, int]] = {}
        restored_tables = set(await _user_tables(conn))
        for table, expected in sorted(manifest["tables"].items()):
            want = 0 if table in NOT_RESTORED else int(expected)
            got = await _count(conn, table) if table in restored_tables else -1
            counts[table] = (want, got)
        for table in sorted(restored_tables - set(manifest["tables"])):
            counts[table] = (-1, await _count(conn, table))
        await _skip_issued_ids(conn)
        finished = 0 if keep_open_commands else await _finish_open_commands(conn)
    finally:
        await conn.close()
    return RestoreReport(
        database=database,
        counts=counts,
        mismatched={t: c for t, c in counts.items() if c[0] != c[1]},
        not_restored=[t for t in NOT_RESTORED if t in manifest["tables"]],
        schema_version=manifest.get("schema_version"),
        pg_restore_version=tools.version,
        duration_s=round(time.monotonic() - started, 3),
        commands_finished=finished,
    )


def _without_data(listing: str, tables: Sequence[str]) -> str:
    """A pg_restore list with the TABLE DATA entries of ``tables`` commented out."""
    out = []
    for line in listing.splitlines():
        fields = line.split()
        if (
            not line.startswith(";")
            and len(fields) >= 7
            and fields[3:5] == ["TABLE", "DATA"]
            and fields[6] in tables
        ):
            out.append(";" + line)
        else:
            out.append(line)
    return "\n".join(out) + "\n"
