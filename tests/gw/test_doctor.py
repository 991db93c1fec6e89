"""``chargegw doctor`` against a real PostgreSQL, real sockets and real resource limits."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import sys
from pathlib import Path
from typing import Any

import asyncpg
from click.testing import CliRunner, Result

from chargegw.cli import main
from chargegw.config import Settings
from chargegw.ops import doctor
from chargegw.ops.doctor import Status, run_checks
from chargegw.store.database import migrations

from .conftest import settings_for
from .waiting import free_port

#: the environment without CHARGEGW_* settings of whoever runs the tests
_ENV = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEGW_")}


def _by_name(report: doctor.Report) -> dict[str, doctor.Check]:
    return {c.name: c for c in report.checks}


def _fitting_connections() -> int:
    """A max_connections the open-file limit of this machine holds (whatever it is)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    room = min(hard, 1 << 20) - doctor.files_needed(Settings(max_connections=0))
    assert room > 0, f"open-file limit {hard} is too low for any test of a healthy node"
    return min(room, 1000)


def _local(dsn: str, **values: Any) -> Settings:
    values.setdefault("max_connections", _fitting_connections())
    return settings_for(dsn, http_port=free_port(), device_port=free_port(), **values)


async def _doctor(*args: str) -> Result:
    """``chargegw doctor ARGS`` (in a thread: the command runs its own event loop), with
    free ports and none of the caller's CHARGEGW_* variables."""
    env = {
        "CHARGEGW_MAX_CONNECTIONS": str(_fitting_connections()),
        "CHARGEGW_DEVICE_HOST": "127.0.0.1",
        "CHARGEGW_DEVICE_PORT": str(free_port()),
        "CHARGEGW_HTTP_PORT": str(free_port()),
    }
    runner = CliRunner()
    with _CleanEnv():
        return await asyncio.to_thread(runner.invoke, main, ["doctor", *args], env=env)


class _CleanEnv:
    """Hide the CHARGEGW_* variables of the environment for the block."""

    def __enter__(self) -> None:
        self.saved = {k: v for k, v in os.environ.items() if k.startswith("CHARGEGW_")}
        for key in self.saved:
            del os.environ[key]

    def __exit__(self, *exc: object) -> None:
        os.environ.update(self.saved)


async def test_healthy_database_passes(db_dsn: str) -> None:
    report = await run_checks(_local(db_dsn))
    checks = _by_name(report)
    assert report.status is not Status.FAIL, report.lines()
    for name in (
        "open-files",
        "postgresql",
        "pg-connections",
        "pg-durability",
        "clock",
        "migrations",
    ):
        assert checks[name].status is Status.OK, checks[name]
    assert checks["migrations"].detail.startswith(f"all {len(migrations())} applied")
    assert checks["device-port"].status is Status.OK
    assert any(c.name == "disk" for c in report.checks)

    result = await _doctor("--dsn", db_dsn, "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["status"] in ("ok", "warn")
    assert {c["check"] for c in body["checks"]} >= {"open-files", "migrations", "clock"}
    for check in body["checks"]:
        assert check["status"] in ("ok", "warn")
        assert (check["fix"] is None) == (check["status"] == "ok"), check


async def test_database_without_migrations_fails_with_the_fix(empty_db_dsn: str) -> None:
    result = await _doctor("--dsn", empty_db_dsn)
    assert result.exit_code == 1, result.output
    line = next(x for x in result.output.splitlines() if x.split()[1:2] == ["migrations"])
    assert line.startswith("fail  migrations")
    assert "no migrations applied" in line
    assert "fix: chargegw migrate" in line


async def test_migrations_missing_or_newer_than_the_code(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("DELETE FROM schema_migrations WHERE version = '0017'")
        check = _by_name(await run_checks(_local(db_dsn)))["migrations"]
        assert check.status is Status.FAIL
        assert "0017_device_registry.sql" in check.detail
        assert check.fix is not None and "chargegw migrate" in check.fix

        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES "
            "('0017', '0017_device_registry.sql'), ('9999', '9999_from_the_future.sql')"
        )
        check = _by_name(await run_checks(_local(db_dsn)))["migrations"]
        assert check.status is Status.FAIL
        assert "9999_from_the_future.sql" in check.detail
        assert "newer chargegw" in check.detail
    finally:
        await conn.close()


async def test_unreachable_database_is_a_clear_failure() -> None:
    dsn = f"postgresql://chargegw:secret@127.0.0.1:{free_port()}/chargegw"
    result = await _doctor("--dsn", dsn)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    line = next(x for x in result.output.splitlines() if x.split()[1:2] == ["postgresql"])
    assert line.startswith("fail  postgresql")
    assert "cannot connect to postgresql://chargegw:***@127.0.0.1" in line
    assert "secret" not in result.output
    assert "fix: start PostgreSQL" in line


async def test_bad_option_is_a_usage_error() -> None:
    result = await _doctor("--workers", "0")
    assert result.exit_code == 2


async def test_port_in_use_is_reported_with_its_holder(pg_server_dsn: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = settings_for(pg_server_dsn, device_port=port, http_port=free_port())
        check = _by_name(await run_checks(settings))["device-port"]
    assert check.status is Status.FAIL
    assert f"127.0.0.1:{port} is in use by another program (pid {os.getpid()}" in check.detail
    assert check.fix is not None and "CHARGEGW_DEVICE_PORT" in check.fix


async def test_too_many_workers_for_postgresql(pg_server_dsn: str) -> None:
    conn = await asyncpg.connect(pg_server_dsn)
    try:
        limit = int(await conn.fetchval("SHOW max_connections"))
    finally:
        await conn.close()
    per_worker = doctor.db_connections_per_worker(_local(pg_server_dsn))
    workers = min(limit // per_worker + 1, 256)
    settings = _local(pg_server_dsn, workers=workers)
    check = _by_name(await run_checks(settings))["pg-connections"]
    assert check.status is Status.FAIL, check
    assert check.fix is not None and "max_connections" in check.fix


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def test_low_open_file_limit_fails_with_the_fix(pg_server_dsn: str) -> None:
    env = {
        **_ENV,
        "CHARGEGW_DSN": pg_server_dsn,
        "CHARGEGW_DEVICE_HOST": "127.0.0.1",
        "CHARGEGW_DEVICE_PORT": str(free_port()),
        "CHARGEGW_HTTP_PORT": str(free_port()),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chargegw",
        "doctor",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_low_nofile,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, err.decode()
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert checks["open-files"]["status"] == "fail"
    assert "limit 256" in checks["open-files"]["detail"]
    assert "LimitNOFILE=" in checks["open-files"]["fix"]
    assert checks["postgresql"]["status"] == "ok"  # the rest was checked all the same


def test_configured_connections_above_the_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 1 << 20) + 1000
    check = doctor.check_open_files(Settings(max_connections=wanted))
    assert check.status is Status.FAIL
    assert check.fix is not None
    assert f"LimitNOFILE={doctor.files_needed(Settings(max_connections=wanted))}" in check.fix
    fits = min(hard, 1 << 20) - doctor.files_needed(Settings(max_connections=0))
    assert check.fix.endswith(f"or lower max_connections to {fits}")
    assert doctor.check_open_files(Settings(max_connections=fits)).status is Status.OK


async def test_embedded_default_starts_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "chargegw-data"
    report = await run_checks(
        Settings(data_dir=str(data_dir), device_port=free_port(), http_port=free_port())
    )
    checks = _by_name(report)
    assert checks["postgresql"].status is Status.WARN
    assert "database checks were skipped" in checks["postgresql"].detail
    assert checks["disk"].status in (Status.OK, Status.WARN)
    assert str(tmp_path) in checks["disk"].detail
    assert report.exit_status == 0
    assert not data_dir.exists()


def test_postgresql_settings_rules() -> None:
    safe = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
    assert doctor._durability_check(safe).status is Status.OK
    lossy = doctor._durability_check({**safe, "synchronous_commit": "off"})
    assert lossy.status is Status.FAIL
    assert lossy.fix is not None and "synchronous_commit = on" in lossy.fix
    assert doctor._wal_check({"wal_level": "minimal"}).status is Status.WARN
    archived = {"wal_level": "replica", "archive_mode": "on"}
    assert doctor._wal_check(archived).status is Status.OK
    today = doctor.dt.date(2026, 12, 4)
    assert doctor._version_check(120022, "12.22", today).status is Status.FAIL
    assert doctor._version_check(130020, "13.20", today).status is Status.WARN  # end of life
    assert doctor._version_check(150020, "15.20", today).status is Status.OK


def test_disk_thresholds(tmp_path: Path) -> None:
    free = doctor.shutil.disk_usage(tmp_path).free
    (tight,) = doctor.disk_check([("data_dir", tmp_path)], daily_growth=free)
    assert tight.status is Status.FAIL
    assert "1 days" in tight.detail
    assert tight.fix is not None and "audit_retention_days" in tight.fix
    # two paths on one file system: one check
    assert len(doctor.disk_check([("a", tmp_path), ("b", tmp_path / "x")], None)) == 1


def test_a_running_gateway_is_known_by_its_command_line() -> None:
    serving = doctor._serves_chargegw
    assert serving(["/opt/chargegw/bin/python", "/opt/chargegw/bin/chargegw", "serve"])
    assert serving(["/opt/chargegw/bin/chargegw", "--config", "c.yaml", "serve"])
    assert serving(["python3", "-m", "chargegw", "serve", "--workers", "4"])
    assert not serving(["/opt/chargegw/bin/chargegw", "doctor"])
    # a repository cloned under a folder named chargegw does not make pytest a gateway
    assert not serving(["/src/chargegw/.venv/bin/python", "-m", "pytest", "serve"])
    assert not doctor._is_chargegw(os.getpid())
