"""Configuration: defaults < YAML file < ``CHARGEGW_*`` environment < command-line flags."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclasses.dataclass
class Settings:
    """Every setting of the gateway, with its default.

    Durations are seconds. The environment variable of a setting is ``CHARGEGW_`` + its
    name in upper case (``CHARGEGW_DEVICE_PORT``); the YAML key is its name.
    """

    #: PostgreSQL DSN; empty = start the embedded server in ``data_dir``
    dsn: str = ""
    data_dir: str = "./chargegw-data"
    device_host: str = "0.0.0.0"
    device_port: int = 8900
    http_host: str = "127.0.0.1"
    http_port: int = 8980
    #: "console" (readable) or "json" (one object per line)
    log_format: str = "console"
    log_level: str = "info"
    #: largest AP3000 frame accepted (ap3000.md 13.2)
    max_frame: int = 512
    #: device connections per process; 0 = as many as the open-file limit allows
    max_connections: int = 0
    #: new connections per second (per process) before new ones are refused
    accept_rate: float = 500.0
    #: worker processes sharing the device and HTTP ports (SO_REUSEPORT)
    workers: int = 1
    #: frames per second one connection may send (bursts up to 5 s worth) before its
    #: reads are paused; 0 = no limit
    frame_rate_per_connection: float = 50.0
    #: frames per second one process decodes before reads are paused; 0 = no limit
    frame_rate_per_process: float = 0.0
    #: more (re)connections than this by one device within ``flap_window_s`` get it
    #: refused for ``flap_ban_s``; 0 = no flapping detection
    flap_max_connects: int = 10
    flap_window_s: float = 300.0
    flap_ban_s: float = 600.0
    #: a process refreshes its row in the cluster table this often ...
    cluster_heartbeat_s: float = 5.0
    #: ... and is declared dead (its devices released) after this long without one
    process_timeout_s: float = 20.0
    #: how often the outbox looks for work it was not notified of, and expires commands
    outbox_scan_s: float = 5.0
    #: on SIGTERM, device connections are closed at this rate (per second) so the piles
    #: reconnect elsewhere gradually; the drain gives up waiting after ``drain_timeout_s``
    drain_rate: float = 500.0
    drain_timeout_s: float = 120.0
    #: a connection that sent nothing for this long is closed
    idle_timeout_s: float = 900.0
    #: decode errors a connection may cause before it is closed
    garbage_budget: int = 20
    #: bytes queued for one connection before its reads are paused
    write_queue_limit: int = 65536
    #: AP3000 heartbeat interval the devices use (3 min by default)
    ap3000_heartbeat_s: float = 180.0
    #: BKV sockets report their status this often (bkv.md 3: every 5 min)
    bkv_status_interval_s: float = 300.0
    #: time zone of the devices' clocks (BKV heartbeat replies carry local time)
    device_timezone: str = "Asia/Shanghai"
    #: missed heartbeat intervals before a device is marked offline
    missed_heartbeats: float = 2.5
    #: consecutive command ACK timeouts before a device is marked offline
    ack_timeouts_offline: int = 3
    #: how often liveness is checked
    liveness_check_s: float = 5.0
    #: batch writer: flush after this many rows or this many seconds
    batch_rows: int = 500
    batch_interval_s: float = 0.1
    #: device, gateway and port state that did not change is upserted again only after
    #: this long (its timestamps are updated on every frame, cheaply); 0 = every time
    state_refresh_s: float = 300.0
    #: rows held while the database is unreachable before reads are paused
    buffer_limit: int = 100000
    #: audit frames kept for this many days (partitions dropped after)
    audit_retention_days: int = 30
    #: a command unanswered this long is sent once more (same msg id), then it is dead
    ack_timeout_s: float = 15.0
    #: least time between two commands to one device
    command_spacing_s: float = 0.5
    #: a command for an offline device waits this long, then it is dead ("offline")
    command_expiry_s: float = 300.0
    #: finished commands are kept this many days
    command_retention_days: float = 7.0
    #: API keys accepted besides those created with ``chargegw apikey create``
    #: (comma-separated); with none at all the HTTP API listens on 127.0.0.1 only
    api_keys: str = ""
    #: node name in logs and the session directory
    node: str = dataclasses.field(default_factory=lambda: os.uname().nodename)
    #: firmware upgrades (firmware.py): how often jobs are looked at (starts, stalls,
    #: timeouts); replies drive the transfers themselves
    firmware_tick_s: float = 1.0
    #: a firmware packet is resent this often at most (no answer, "resend", "checksum
    #: error"), then the device fails (ap3000.md 3: up to 3 times)
    firmware_packet_resends: int = 3
    #: restarts from packet 1 (asked for by the device, or after failed legacy
    #: retransmissions) before the device fails
    firmware_max_restarts: int = 3
    #: after the last packet, how long to wait for the device to report its version
    firmware_reboot_timeout_s: float = 600.0
    #: BKV OTA: how long the gateway may take to download, reboot and report its version
    firmware_ota_timeout_s: float = 1800.0
    #: a device offline mid-transfer (or queued and offline) this long fails
    firmware_offline_timeout_s: float = 3600.0
    #: largest firmware image accepted for upload
    firmware_max_bytes: int = 8 * 1024 * 1024
    #: device parameters (params.py): after a reconnect or a registration, desired
    #: parameters are read back; values that drifted are set again (False: the group
    #: shows ``mismatch``; the ``param_drift`` event is written either way)
    params_reapply_on_drift: bool = True
    #: how often each process looks at profile jobs (starts, finished jobs) and at
    #: parameter commands that died
    params_tick_s: float = 1.0
    #: drift checks (read-backs after reconnects) queued per second per process, at most
    params_drift_checks_per_s: float = 200.0

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked (for ``config show``)."""
        out = dataclasses.asdict(self)
        out["dsn"] = mask_dsn(self.dsn)
        out["api_keys"] = "***" if self.api_keys else ""
        return out


_SECRET_IN_DSN = re.compile(r"(://[^:/@]+:)([^@]*)(@)")


def mask_dsn(dsn: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _SECRET_IN_DSN.sub(
        lambda m: m.group(1) + ("***" if m.group(2) else "") + m.group(3), dsn
    )


def _coerce(name: str, value: Any, target: Any) -> Any:
    kind = type(target)
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the effective settings from the layers, each overriding the one before."""
    settings = Settings()
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        layers.append((str(path), loaded))
    environ = os.environ if env is None else env
    layers.append(
        (
            "environment",
            {
                name: environ[f"CHARGEGW_{name.upper()}"]
                for name in fields
                if f"CHARGEGW_{name.upper()}" in environ
            },
        )
    )
    layers.append(("flags", {k: v for k, v in (overrides or {}).items() if v is not None}))
    for source, layer in layers:
        for name, value in layer.items():
            if name not in fields:
                raise ConfigError(f"{source}: unknown setting {name}")
            setattr(settings, name, _coerce(name, value, getattr(settings, name)))
    if settings.log_format not in ("console", "json"):
        raise ConfigError("log_format must be 'console' or 'json'")
    return settings
