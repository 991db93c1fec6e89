"""Configuration: defaults < YAML file < ``CHARGEGW_*`` environment < command-line flags.

:class:`Settings` is a pydantic-settings model: every setting has a type, a default and
the values it allows (ranges, choices, real time zones, strict booleans). Building one
directly (``Settings(device_port=0)``) takes only the values given and the defaults;
:func:`load_settings` adds the layers. A bad value, an unknown key in the file or an
unknown ``CHARGEGW_*`` variable is a :class:`ConfigError` with one line per problem,
naming the key, where it came from and what is allowed::

    CHARGEGW_DEVICE_PORT=-5 (environment): must be between 0 and 65535
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import annotated_types
import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from chargegw.quirks import QuirkConfigError, parse_profiles

#: the environment variable of a setting is this + its name in upper case
ENV_PREFIX: Final = "CHARGEGW_"
#: ``CHARGEGW_*`` variables that are not settings: the config file, and the test and
#: load-test tools' own (any name starting with one of ``OTHER_ENV_PREFIXES``)
OTHER_ENV_VARS: Final = frozenset({"CHARGEGW_CONFIG"})
OTHER_ENV_PREFIXES: Final = ("CHARGEGW_TEST_", "CHARGEGW_LOADTEST_", "CHARGEGW_CHAOS_")

_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
#: the settings whose values are never shown (``config show``, error messages)
_SECRETS: Final = frozenset({"dsn", "api_keys"})


class ConfigError(Exception):
    """A configuration value is missing, unknown or not allowed.

    ``problems`` has one line per bad value; ``str()`` joins them.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# ---------------------------------------------------------------- value types


class _Allowed:
    """Annotation metadata: what a non-numeric setting allows, in words."""

    def __init__(self, text: str) -> None:
        self.text = text


def _not_bool(value: Any) -> Any:
    # pydantic takes True for 1; a boolean where a number belongs is a mistake
    if isinstance(value, bool):
        raise PydanticCustomError("not_a_number", "a boolean is not a number")
    return value


def _strict_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise PydanticCustomError("strict_bool", "not a boolean")


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _time_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise PydanticCustomError("time_zone", "unknown time zone") from None
    return value


def _dsn(value: str) -> str:
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise PydanticCustomError("dsn", "not a PostgreSQL URL")
    return value


def _not_empty(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty", "empty")
    return value


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_address(host: str | None) -> IPAddress | None:
    """The address a peer connects from, as allow-lists and limits see it: an IPv4-mapped
    IPv6 address (``::ffff:10.1.2.3``, a dual-stack listener) is the IPv4 address; None if
    ``host`` is not an IP address."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8, 2001:db8::/32"`` -> the networks (a bare address is a /32 or /128).

    Raises ``ValueError`` naming the first entry that is not a network address (host
    bits set, such as ``10.0.0.1/8``, are refused: they are usually a typo)."""
    networks = []
    for item in text.split(","):
        entry = item.strip()
        if entry:
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError as exc:
                raise ValueError(f"{entry!r}: {exc}") from None
    return tuple(networks)


def _networks(value: Any) -> Any:
    # a YAML list is as good as the comma-separated form of the environment
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    if isinstance(value, str):
        try:
            parse_networks(value)
        except ValueError:
            raise PydanticCustomError("networks", "not a list of IP networks") from None
    return value


def parse_schedule(text: str) -> tuple[float, ...]:
    """``"5, 30, 120"`` -> ``(5.0, 30.0, 120.0)``: seconds, each greater than 0 and at most
    a week, one to fifty of them. Raises ``ValueError`` naming the first bad entry."""
    entries = [item.strip() for item in text.split(",") if item.strip()]
    if not 1 <= len(entries) <= 50:
        raise ValueError("one to fifty entries")
    seconds = []
    for entry in entries:
        try:
            value = float(entry)
        except ValueError:
            raise ValueError(f"{entry!r} is not a number") from None
        if not 0 < value <= 7 * 86400:  # also NaN
            raise ValueError(f"{entry!r} is not between 0 and 604800")
        seconds.append(value)
    return tuple(seconds)


def _schedule(value: Any) -> Any:
    # a YAML list is as good as the comma-separated form of the environment
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    if isinstance(value, str):
        try:
            parse_schedule(value)
        except ValueError:
            raise PydanticCustomError("schedule", "not a list of seconds") from None
    return value


Whole = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]
Port = Annotated[Whole, Field(ge=0, le=65535)]
#: a duration or rate that must be positive
Positive = Annotated[Number, Field(gt=0)]
#: a duration or rate where 0 means "none" or "off"
NonNegative = Annotated[Number, Field(ge=0)]
Count = Annotated[Whole, Field(ge=1)]
CountOrZero = Annotated[Whole, Field(ge=0)]
StrictBool = Annotated[
    bool,
    BeforeValidator(_strict_bool),
    _Allowed("true or false (also 1/0, yes/no, on/off)"),
]
Host = Annotated[str, AfterValidator(_not_empty), _Allowed("a host name or IP address")]
TimeZone = Annotated[
    str, AfterValidator(_time_zone), _Allowed("a time zone name such as Asia/Shanghai or UTC")
]
Schedule = Annotated[
    str,
    BeforeValidator(_schedule),
    _Allowed("seconds separated by commas, each greater than 0 and at most 604800"),
]
Networks = Annotated[
    str,
    BeforeValidator(_networks),
    _Allowed("IP networks in CIDR notation separated by commas (10.0.0.0/8,2001:db8::/32)"),
]


def _quirk_profiles(value: Any) -> Any:
    try:
        parse_profiles(value)
    except QuirkConfigError as exc:
        raise PydanticCustomError("quirk_profiles", "{problems}", {"problems": str(exc)}) from None
    return value


QuirkProfiles = Annotated[
    list[dict[str, Any]],
    BeforeValidator(_quirk_profiles),
    _Allowed("a list of quirk profiles (docs/quirks.md)"),
]
RegistryMode = Literal["off", "log", "enforce"]
LogFormat = Literal["console", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


def _node_name() -> str:
    return os.uname().nodename


class Settings(BaseSettings):
    """Every setting of the gateway, with its default and the values it allows.

    Durations are seconds. The environment variable of a setting is ``CHARGEGW_`` + its
    name in upper case (``CHARGEGW_DEVICE_PORT``); the YAML key is its name.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        validate_assignment=True,
        allow_inf_nan=False,
        # `node: 7` or `api_keys: 12345` in YAML are strings, as they would be in the env
        coerce_numbers_to_str=True,
    )

    dsn: Annotated[
        str,
        AfterValidator(_dsn),
        _Allowed("empty (the embedded PostgreSQL) or a postgresql:// URL"),
    ] = Field("", description="PostgreSQL DSN; empty = start the embedded server in `data_dir`")
    db_pool_size: Count = Field(
        10,
        description="database connections of one worker process's pool (device state, the "
        "outbox, the HTTP API); the cluster directory and the listeners open 5 more. "
        "PostgreSQL's `max_connections` must hold them for every worker (`chargegw doctor`)",
    )
    data_dir: Annotated[str, AfterValidator(_not_empty), _Allowed("a directory")] = Field(
        "./chargegw-data", description="where the embedded PostgreSQL keeps its files"
    )
    device_host: Host = Field("0.0.0.0", description="address of the device listener")
    device_port: Port = Field(
        8900, description="port of the device listener (both protocols); 0 = any free port"
    )
    http_host: Host = Field("127.0.0.1", description="address of the HTTP API")
    http_port: Port = Field(8980, description="port of the HTTP API; 0 = any free port")
    log_format: Annotated[LogFormat, BeforeValidator(_lower)] = Field(
        "console", description="`console` (readable) or `json` (one object per line)"
    )
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = Field(
        "info", description="least severe log level shown"
    )
    # AP3000 frames are 14 bytes at least and 65540 at most (ap3000.md 13.2)
    max_frame: Whole = Field(
        512,
        ge=64,
        le=65540,
        description="largest AP3000 frame accepted; a longer announced length is an error, "
        "never buffered",
    )
    max_connections: CountOrZero = Field(
        0,
        description="device connections per process; 0 = as many as the open-file limit allows",
    )
    accept_rate: Positive = Field(
        500.0, description="new connections per second per process before new ones are refused"
    )
    workers: Whole = Field(
        1,
        ge=1,
        le=256,
        description="worker processes sharing the device and HTTP ports (SO_REUSEPORT)",
    )
    frame_rate_per_connection: NonNegative = Field(
        50.0,
        description="frames per second one connection may send (bursts of 5 s worth) before "
        "its reads are paused; 0 = no limit",
    )
    frame_rate_per_process: NonNegative = Field(
        0.0,
        description="frames per second one process decodes before reads are paused; 0 = no limit",
    )
    flap_max_connects: CountOrZero = Field(
        10,
        description="more (re)connections than this by one device within `flap_window_s` get "
        "it refused for `flap_ban_s`; 0 = no flapping detection",
    )
    flap_window_s: Positive = Field(300.0, description="see `flap_max_connects`")
    flap_ban_s: Positive = Field(600.0, description="see `flap_max_connects`")
    cluster_heartbeat_s: Positive = Field(
        5.0, description="a process refreshes its row in the cluster table this often"
    )
    process_timeout_s: Positive = Field(
        20.0,
        description="a process without a heartbeat this long is declared dead and its devices "
        "released; more than `cluster_heartbeat_s`",
    )
    outbox_scan_s: Positive = Field(
        5.0,
        description="how often the outbox looks for work it was not notified of, and expires "
        "commands",
    )
    drain_rate: Positive = Field(
        500.0,
        description="on SIGTERM, device connections are closed this many per second, so the "
        "piles reconnect elsewhere gradually",
    )
    drain_timeout_s: NonNegative = Field(
        120.0, description="the drain gives up waiting after this long"
    )
    idle_timeout_s: Positive = Field(
        900.0, description="a connection that sent nothing for this long is closed"
    )
    device_identify_timeout_s: Positive = Field(
        30.0,
        description="a device connection that sent no complete valid frame this long after "
        "it was accepted is closed (`identify_timeout`)",
    )
    gc_full_s: NonNegative = Field(
        300.0,
        description="a worker collects its garbage in full this often, then freezes what "
        "survived, so that CPython's automatic full passes in between (a pause of every "
        "answer, 100 ms and more with 20,000 piles) walk only newer objects; 0 = CPython's "
        "own schedule only",
    )
    overload_lag_s: Positive = Field(
        0.25,
        description="event-loop lag from which a worker counts as behind (overloaded): "
        "`/readyz` fails its `load` check, `chargegw_worker_behind` is 1, and connections "
        "not read yet are not held to `device_identify_timeout_s` or the per-source cap; "
        "it is no longer behind after 2 s below half of this",
    )
    device_max_unidentified_per_source: CountOrZero = Field(
        512,
        description="device connections from one source address that have not identified "
        "themselves yet; one more is closed at once (`per_source`); 0 = no cap",
    )
    device_allowed_networks: Networks = Field(
        "",
        description="source networks device connections are accepted from; others are "
        "closed at accept (`network`); empty = any",
    )
    device_registry_mode: Annotated[RegistryMode, BeforeValidator(_lower)] = Field(
        "off",
        description="`enforce`: only devices in the registry (`/api/v1/devices/registry`) are "
        "served, others are closed (`unregistered`); `log`: served, but logged and counted",
    )
    device_registry_refresh_s: Positive = Field(
        1.0,
        description="how often each process looks for registry changes (a removed device is "
        "disconnected within about this long)",
    )
    garbage_budget: CountOrZero = Field(
        20, description="decode errors a connection may cause before it is closed"
    )
    write_queue_limit: Whole = Field(
        65536,
        ge=1024,
        description="bytes queued for one connection before its reads are paused",
    )
    ap3000_heartbeat_s: Positive = Field(
        180.0, description="AP3000 heartbeat interval of the piles"
    )
    bkv_status_interval_s: Positive = Field(
        300.0, description="how often BKV sockets report their status (bkv.md 3: every 5 min)"
    )
    device_timezone: TimeZone = Field(
        "Asia/Shanghai",
        description="time zone of the devices' clocks (BKV heartbeat replies carry local time)",
    )
    missed_heartbeats: Number = Field(
        2.5,
        ge=1,
        description="missed heartbeat intervals before a device is marked offline",
    )
    ack_timeouts_offline: Count = Field(
        3, description="consecutive command ACK timeouts before a device is marked offline"
    )
    liveness_check_s: Positive = Field(5.0, description="how often liveness is checked")
    compliance_flush_s: Positive = Field(
        5.0,
        description="protocol deviations and frames counted per device are added to the "
        "database this often (docs/compliance.md)",
    )
    compliance_missing_heartbeat_periods: Number = Field(
        3.0,
        ge=1,
        description="an AP3000 pile that registered and sent no 0x21 within this many "
        "heartbeat intervals counts a `missing_heartbeat`",
    )
    compliance_clock_drift_s: Positive = Field(
        300.0,
        description="a device time further than this from the server's counts a `clock_drift`",
    )
    quirk_profiles: QuirkProfiles = Field(
        [],
        description="quirk profiles to add, override (by name) or disable (`enabled: false`) "
        "besides the shipped ones (docs/quirks.md); in the environment as JSON",
    )
    batch_rows: Count = Field(
        500, description="database writes are batched: flushed at this many rows ..."
    )
    batch_interval_s: Positive = Field(0.1, description="... or every this many seconds")
    state_refresh_s: NonNegative = Field(
        300.0,
        description="device, gateway and port state that did not change is written again "
        "only after this long (its timestamps are updated on every batch); 0 = every time",
    )
    buffer_limit: Count = Field(
        100000, description="rows held while the database is unreachable before reads pause"
    )
    audit_retention_days: Whole = Field(
        30,
        ge=1,
        le=36500,
        description="days of audit frames kept (daily partitions are dropped after)",
    )
    device_events_retention_days: Whole = Field(
        90,
        ge=1,
        le=36500,
        description="days of the device event log (`GET /api/v1/devices/{id}/events`) kept",
    )
    ack_timeout_s: Positive = Field(
        15.0,
        description="a command unanswered this long is sent once more (same msg id), then it "
        "is dead",
    )
    command_spacing_s: NonNegative = Field(
        0.5, description="least time between two commands to one device"
    )
    command_expiry_s: Positive = Field(
        300.0,
        description="a command for an offline device waits this long, then it is dead (`offline`)",
    )
    command_retention_days: Positive = Field(
        7.0, description="finished commands are kept this many days"
    )
    api_keys: Annotated[str, _Allowed("keys separated by commas")] = Field(
        "",
        description="API keys accepted besides those created with `chargegw apikey create` "
        "(comma-separated); with none at all the HTTP API listens on 127.0.0.1 only",
    )
    console_session_lifetime_s: Positive = Field(
        12 * 3600.0,
        description="a console sign-in lasts at most this long (docs/console.md)",
    )
    console_idle_timeout_s: Positive = Field(
        3600.0, description="a console session unused this long ends"
    )
    http_max_in_flight: CountOrZero = Field(
        64,
        description="HTTP requests one worker process serves at a time; one more is answered "
        "503 `busy` with `Retry-After: 1` at once, so an API overload cannot starve the "
        "devices' frames of the event loop (health, readiness and metrics are always served); "
        "`0` = no cap",
    )
    http_max_body_bytes: Count = Field(
        1024 * 1024,
        description="largest HTTP request body; a larger one is refused with 413 before it is "
        "read (the firmware upload takes up to `firmware_max_bytes`)",
    )
    auth_failures_per_minute: NonNegative = Field(
        30.0,
        description="failed authentications (401) one source address may cause per minute per "
        "process, after a burst of `auth_failure_burst`; past that its requests are answered "
        "429 for `auth_block_s` without checking their key; 0 = no limit",
    )
    auth_failure_burst: Count = Field(10, description="see `auth_failures_per_minute`")
    auth_block_s: Positive = Field(60.0, description="see `auth_failures_per_minute`")
    control_rate_per_key: NonNegative = Field(
        20.0,
        description="control calls (start, stop, modify, commands, cancel, parameters, "
        "upgrades) per second per API key, shared by the workers of a node; past it 429; "
        "0 = no limit",
    )
    control_burst_per_key: Count = Field(
        40, description="control calls one key may make at once above `control_rate_per_key`"
    )
    control_rate_global: NonNegative = Field(
        500.0,
        description="control calls per second of all keys together, shared by the workers of "
        "a node (bursts of one second's worth); past it 429; 0 = no limit",
    )
    rate_limit_all_writes: StrictBool = Field(
        False,
        description="count every write (POST, PUT, PATCH, DELETE) under /api/v1 against the "
        "control rate limits, not only the control calls",
    )
    call_audit_retention_days: Whole = Field(
        90,
        ge=1,
        le=36500,
        description="days the audit trail of API calls (`/api/v1/audit/calls`) is kept",
    )
    node: Annotated[str, AfterValidator(_not_empty), _Allowed("a name")] = Field(
        default_factory=_node_name,
        description="this node's name in logs, the session directory and `chargegw nodes` "
        "(default: the host name)",
    )
    firmware_tick_s: Positive = Field(
        1.0, description="how often firmware jobs are looked at (starts, stalls, timeouts)"
    )
    firmware_packet_resends: CountOrZero = Field(
        3,
        description="a firmware packet is resent this often at most, then the device fails",
    )
    firmware_max_restarts: CountOrZero = Field(
        3, description="restarts from packet 1 before the device fails"
    )
    firmware_reboot_timeout_s: Positive = Field(
        600.0,
        description="after the last packet, how long to wait for the device to report its version",
    )
    firmware_ota_timeout_s: Positive = Field(
        1800.0,
        description="BKV OTA: how long the gateway may take to download, reboot and report "
        "its version",
    )
    firmware_offline_timeout_s: Positive = Field(
        3600.0, description="a device offline mid-transfer (or queued and offline) this long fails"
    )
    firmware_max_bytes: Count = Field(
        8 * 1024 * 1024, description="largest firmware image accepted for upload"
    )
    params_reapply_on_drift: StrictBool = Field(
        True,
        description="desired parameters that drifted (read back after a reconnect or a "
        "registration) are set again; false: the group shows `mismatch`",
    )
    params_tick_s: Positive = Field(
        1.0,
        description="how often each process looks at profile jobs and at parameter commands "
        "that died",
    )
    params_drift_checks_per_s: Positive = Field(
        200.0,
        description="drift checks (read-backs after reconnects) queued per second per "
        "process, at most",
    )
    events_sequence_s: Positive = Field(
        1.0,
        description="events get their ids at once when committed, and besides this often "
        "(a notification lost while the database was away)",
    )
    events_retention_days: Whole = Field(
        30,
        ge=1,
        le=36500,
        description="days of events kept (for the event stream's replay, the pull API and "
        "webhook replays)",
    )
    events_stream_buffer: Whole = Field(
        1000,
        ge=10,
        le=100000,
        description="events held for one event-stream subscriber that does not keep up; "
        "when full it is disconnected",
    )
    events_heartbeat_s: Positive = Field(
        15.0, description="the event stream sends a comment line after this long without events"
    )
    webhooks_allow_private: StrictBool = Field(
        False,
        description="webhook URLs may point at private, loopback, link-local and multicast "
        "addresses; otherwise they are refused when a subscription is written and again "
        "at each attempt",
    )
    webhooks_poll_s: Positive = Field(
        1.0,
        description="each process looks for due webhook deliveries at least this often "
        "(new events wake it at once)",
    )
    webhooks_retry_schedule_s: Schedule = Field(
        "5,30,120,600,1800,3600,10800",
        description="seconds before the 2nd, 3rd ... attempt of a webhook delivery (+-20 % "
        "jitter); the last one repeats",
    )
    webhooks_disable_after_s: Positive = Field(
        259200.0,
        description="a webhook delivery this old is given up after a failed attempt; a "
        "subscription failing this long is disabled",
    )
    webhooks_retention_days: Positive = Field(
        7.0, description="finished webhook deliveries are kept this long"
    )
    webhooks_max_in_flight: Whole = Field(
        256, ge=1, le=10000, description="webhook attempts in flight at once per process"
    )
    webhooks_lease_margin_s: Positive = Field(
        30.0,
        description="a webhook attempt's claim lasts its timeout plus this; a process killed "
        "mid-attempt leaves the delivery to another one after that",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given: ``Settings(**values)`` is exactly those and the defaults
        (the workers and the tests rely on it); :func:`load_settings` adds the layers."""
        return (init_settings,)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        for larger, smaller in _ORDERED:
            if getattr(self, larger) <= getattr(self, smaller):
                raise PydanticCustomError("order", "order", {"setting": larger, "other": smaller})
        return self

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked (for ``config show``)."""
        out = self.model_dump()
        out["dsn"] = mask_dsn(self.dsn)
        out["api_keys"] = "***" if self.api_keys else ""
        return out


#: (a, b): setting a must be greater than setting b
_ORDERED: Final = (("process_timeout_s", "cluster_heartbeat_s"),)

_SECRET_IN_DSN = re.compile(r"(://[^:/@]+:)([^@]*)(@)")


def mask_dsn(dsn: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _SECRET_IN_DSN.sub(
        lambda m: m.group(1) + ("***" if m.group(2) else "") + m.group(3), dsn
    )


# ---------------------------------------------------------------- what is allowed


def env_var(name: str) -> str:
    """The environment variable of setting ``name``."""
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    """The command-line flag of setting ``name`` (``serve`` has flags for some)."""
    return "--" + name.replace("_", "-")


def _bounds(field: FieldInfo) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for item in field.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, attr.title())):
                bounds[attr] = getattr(item, attr)
    return bounds


def _fmt(number: float) -> str:
    return f"{number:g}"


def _range(field: FieldInfo) -> str:
    b = _bounds(field)
    low = f"{_fmt(b['ge'])}" if "ge" in b else None
    if "le" in b and low is not None:
        return f"between {low} and {_fmt(b['le'])}"
    if "gt" in b:
        return f"greater than {_fmt(b['gt'])}"
    if low is not None:
        return f"at least {low}"
    return "a number"


def allowed(name: str) -> str:
    """What setting ``name`` allows, in words (``a whole number between 0 and 65535``)."""
    field = Settings.model_fields[name]
    if field.annotation is int or field.annotation is float:
        kind = "a whole number" if field.annotation is int else "a number"
        if not _bounds(field):
            return kind
        limits = _range(field)
        return f"{kind} of {limits}" if limits.startswith("at least") else f"{kind} {limits}"
    choices = get_args(field.annotation)
    if choices and all(isinstance(c, str) for c in choices):
        return "one of " + ", ".join(choices)
    for item in field.metadata:
        if isinstance(item, _Allowed):
            return item.text
    return "a string"


def reference() -> list[tuple[str, str, str, str, str]]:
    """(setting, environment variable, default, allowed values, meaning) of every setting,
    in order: the table of docs/operator-guide.md."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "host name" if name == "node" else field.get_default(call_default_factory=False)
        if isinstance(default, bool):
            shown = str(default).lower()
        elif default == "":
            shown = "empty"
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        rows.append((name, env_var(name), shown, allowed(name), field.description or ""))
    return rows


# ---------------------------------------------------------------- layers


class _Source:
    """Where values came from, to name it in error messages."""

    def __init__(self, label: str, key: Mapping[str, str]) -> None:
        self.label = label
        self._key = key

    def key(self, name: str) -> str:
        return self._key.get(name, name)


class _YamlFile(YamlConfigSettingsSource):
    """The YAML file; a file that is not a mapping of names is a ConfigError."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            loaded = yaml.safe_load(Path(file_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {file_path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file_path} is not valid YAML: {exc}") from None
        if loaded is None:
            return {}
        if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
            raise ConfigError(f"{file_path}: expected a mapping of setting names to values")
        return loaded


class _Environment(EnvSettingsSource):
    """``CHARGEGW_*`` variables of ``environ`` (not necessarily ``os.environ``)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _unknown_env(environ: Mapping[str, str]) -> list[str]:
    """``CHARGEGW_*`` variables that name no setting (typos), with a suggestion."""
    known = {env_var(name) for name in Settings.model_fields}
    problems = []
    for var in sorted(environ):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in OTHER_ENV_VARS:
            continue
        if upper.startswith(OTHER_ENV_PREFIXES):
            continue
        problems.append(f"{var} (environment): {_unknown(upper, known)}")
    return problems


def _unknown(key: str, known: set[str]) -> str:
    """The words "unknown setting", with the closest known name if one is close (compared without
    the ``CHARGEGW_`` every variable shares)."""
    prefix = ENV_PREFIX if key.startswith(ENV_PREFIX) else ""
    names = sorted(k.removeprefix(prefix) for k in known)
    close = difflib.get_close_matches(key.removeprefix(prefix), names, n=1)
    return "unknown setting" + (f"; did you mean {prefix}{close[0]}?" if close else "")


def _shown(name: str, value: Any) -> str:
    if name in _SECRETS and value:
        return mask_dsn(str(value)) if name == "dsn" else "***"
    if isinstance(value, str) and (not value or value.strip() != value):
        return repr(value)
    return str(value)


def _problem(
    error: Any, values: Mapping[str, Any], sources: Mapping[str, _Source], default: _Source
) -> str:
    loc = error.get("loc") or ()
    name = str(loc[0]) if loc else ""
    if error["type"] == "order":
        name, other = error["ctx"]["setting"], error["ctx"]["other"]
        source, other_source = sources.get(name, default), sources.get(other, default)
        return (
            f"{source.key(name)}={_shown(name, values.get(name))} ({source.label}): must be "
            f"greater than {other} ({other_source.key(other)}="
            f"{_shown(other, values.get(other))}, {other_source.label})"
        )
    source = sources.get(name, default)
    if error["type"] == "quirk_profiles":
        return f"{source.key(name)} ({source.label}): {error['ctx']['problems']}"
    if name not in Settings.model_fields:
        known = set(Settings.model_fields)
        return f"{source.key(name)} ({source.label}): {_unknown(name, known)}"
    field = Settings.model_fields[name]
    shown = _shown(name, values.get(name, error.get("input")))
    prefix = f"{source.key(name)}={shown} ({source.label}): must be"
    if error["type"] in ("greater_than", "greater_than_equal", "less_than_equal", "less_than"):
        return f"{prefix} {_range(field)}"
    return f"{prefix} {allowed(name)}"


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """The effective settings: defaults < the YAML file at ``path`` < ``CHARGEGW_*``
    variables of ``env`` (default ``os.environ``) < ``overrides`` (the command-line
    flags; None values are left out). Raises :class:`ConfigError` naming every bad value.
    """
    environ = os.environ if env is None else env
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values: dict[str, Any] = {}
    sources: dict[str, _Source] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such file")
        from_file = _YamlFile(Settings, yaml_file=Path(path))()
        values.update(from_file)
        sources.update(dict.fromkeys(from_file, _Source(str(path), {})))
    from_env = _Environment(Settings, environ)()
    by_upper = {k.upper(): k for k in environ}
    env_source = _Source(
        "environment", {name: by_upper.get(env_var(name), env_var(name)) for name in from_env}
    )
    values.update(from_env)
    sources.update(dict.fromkeys(from_env, env_source))
    values.update(flags)
    sources.update(dict.fromkeys(flags, _Source("command line", {n: flag(n) for n in flags})))
    problems = _unknown_env(environ)
    settings = None
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        default = _Source("default", {})
        problems += [_problem(e, values, sources, default) for e in exc.errors()]
    if problems or settings is None:
        raise ConfigError(*problems)
    return settings
