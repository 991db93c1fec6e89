"""What a chaos run is configured with, and the settings it gives the platform."""

from __future__ import annotations

import dataclasses
from typing import Final

#: every fault kind the fault driver knows, in the order of docs/chaos.md
FAULT_KINDS: Final = (
    "kill",  # SIGKILL of one worker; the supervisor starts it again
    "outage",  # the database refuses connections and its backends are terminated
    "readonly",  # the database turns read-only (new transactions), backends terminated
    "drop",  # piles' connections dropped (they reconnect, maybe to another worker)
    "lose_acks",  # piles ignore the acknowledgement of a settlement / end report
    "changed_readings",  # BKV end-report resends with other live readings
    "omit_tags",  # BKV 0x1004 end reports without tag 0x0A (business number)
)


class ChaosError(Exception):
    """The chaos run could not be carried out (not an invariant violation)."""


@dataclasses.dataclass
class ChaosOptions:
    """Everything a chaos run is configured with (the CLI's options).

    ``piles`` counts devices with ports: AP3000 piles plus BKV sockets; ``bkv_share`` of
    them are BKV sockets, ``bkv_sockets`` per gateway (500 and 0.3: 350 AP3000 piles and
    30 gateways with 5 sockets). Protocol intervals are divided by ``accel``.
    """

    duration_s: float = 540.0
    piles: int = 500
    seed: int = 1
    quiet_timeout_s: float = 240.0
    faults: tuple[str, ...] = FAULT_KINDS
    report: str | None = "chaos-report.json"
    #: a PostgreSQL server to create the run's database on (None: an embedded one)
    dsn: str | None = None
    workers: int = 3
    bkv_share: float = 0.3
    bkv_sockets: int = 5
    ap3000_ports: int = 2
    accel: float = 10.0
    #: session actions per second per 100 piles (starts, stops, swipes, device starts)
    activity: float = 1.5
    #: where the gateway's log goes (default: a temporary directory, kept after the run)
    log_dir: str | None = None
    #: keep the run's database afterwards (to look at it); dropped by default
    keep_database: bool = False
    #: a status line every this many seconds
    status_every_s: float = 15.0
    quiet: bool = False

    def check(self) -> None:
        """Raise :class:`ChaosError` for options that cannot work together."""
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown:
            raise ChaosError(
                f"unknown fault kind(s) {', '.join(unknown)}; known: " + ", ".join(FAULT_KINDS)
            )
        if self.duration_s < 10:
            raise ChaosError("--duration must be at least 10 s")
        if self.piles < 2:
            raise ChaosError("--piles must be at least 2")
        if not 0.0 <= self.bkv_share <= 1.0:
            raise ChaosError("the BKV share is a fraction between 0 and 1")
        if self.workers < 1 or self.accel <= 0 or self.bkv_sockets < 1:
            raise ChaosError("workers, accel and BKV sockets must be positive")
        if self.quiet_timeout_s < 10:
            raise ChaosError("--quiet-timeout must be at least 10 s")

    @property
    def bkv_gateways(self) -> int:
        """BKV gateways (each with ``bkv_sockets`` sockets)."""
        if self.bkv_share <= 0:
            return 0
        return max(1, round(self.piles * self.bkv_share / self.bkv_sockets))

    @property
    def ap3000_piles(self) -> int:
        """AP3000 piles: the rest of ``piles`` after the BKV sockets."""
        return max(0, self.piles - self.bkv_gateways * self.bkv_sockets)


# Protocol intervals of the simulated piles, in pile seconds (divided by ``accel``).
AP3000_HEARTBEAT_S: Final = 180.0
BKV_HEARTBEAT_S: Final = 60.0
BKV_STATUS_S: Final = 300.0


def gateway_settings(opts: ChaosOptions) -> dict[str, str]:
    """``CHARGEGW_*`` settings of the platform under test: short timeouts for a short run,
    liveness matched to the simulated piles' accelerated intervals."""
    return {
        "command_expiry_s": "60",
        "ack_timeout_s": "3",
        "process_timeout_s": "10",
        "cluster_heartbeat_s": "2",
        "outbox_scan_s": "2",
        "command_spacing_s": "0.2",
        "liveness_check_s": "1",
        "ap3000_heartbeat_s": f"{AP3000_HEARTBEAT_S / opts.accel:g}",
        "bkv_status_interval_s": f"{BKV_STATUS_S / opts.accel:g}",
        # reconnects caused by the faults are not flapping: a ban would only hide devices
        "flap_max_connects": "1000",
        "max_connections": str(opts.piles + 1000),
        "drain_timeout_s": "20",
        "log_format": "json",
        "log_level": "info",
    }
