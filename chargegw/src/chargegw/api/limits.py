"""The limits of the HTTP API's request hygiene, without I/O: token buckets, the
failed-authentication limiter per source address, the control-call limiter per key and
overall, and which calls are control calls. Time is an argument (``now``, seconds of a
monotonic clock); :mod:`chargegw.api.guard` applies them to requests.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import math
import re

from chargegw.config import Settings, peer_address

__all__ = [
    "CONTROL_PATH",
    "ControlLimiter",
    "FailedAuthLimiter",
    "HttpLimits",
    "TokenBucket",
    "address_key",
    "is_control",
]

#: source addresses the failed-authentication limiter remembers, per process
MAX_ADDRESSES = 10_000
#: API keys the control-call limiter remembers, per process
MAX_KEYS = 10_000
#: a key's rate limiting is logged at most this often
LOG_EVERY_S = 60.0
#: where firmware images are uploaded (``firmware_max_bytes``, not ``http_max_body_bytes``)
FIRMWARE_UPLOAD = ("POST", "/api/v1/firmware")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: the calls that create commands or orders (with a write method)
CONTROL_PATH = re.compile(
    r"^/api/v1/(?:devices/[^/]+/(?:ports/[^/]+/(?:start|stop|modify)|commands|params)"
    r"|orders/[^/]+/cancel|param-profiles/[^/]+/apply|upgrade-jobs(?:/[^/]+/cancel)?)/?$"
)


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """The limits of :mod:`chargegw.config` this module enforces (0 rate = no limit)."""

    max_body_bytes: int = 1024 * 1024
    firmware_max_bytes: int = 8 * 1024 * 1024
    auth_failures_per_minute: float = 30.0
    auth_failure_burst: int = 10
    auth_block_s: float = 60.0
    control_rate_per_key: float = 20.0
    control_burst_per_key: int = 40
    control_rate_global: float = 500.0
    all_writes: bool = False
    #: requests served at a time by this process (0: no cap)
    max_in_flight: int = 0
    #: worker processes of the node: the control rates are divided among them
    workers: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        """The limits ``settings`` configure."""
        return cls(
            max_body_bytes=settings.http_max_body_bytes,
            firmware_max_bytes=settings.firmware_max_bytes,
            auth_failures_per_minute=settings.auth_failures_per_minute,
            auth_failure_burst=settings.auth_failure_burst,
            auth_block_s=settings.auth_block_s,
            control_rate_per_key=settings.control_rate_per_key,
            control_burst_per_key=settings.control_burst_per_key,
            control_rate_global=settings.control_rate_global,
            all_writes=settings.rate_limit_all_writes,
            max_in_flight=settings.http_max_in_flight,
            workers=settings.workers,
        )

    def body_limit(self, method: str, path: str) -> int:
        """The largest body of a request to ``path``."""
        if (method, path.rstrip("/")) == FIRMWARE_UPLOAD:
            return max(self.firmware_max_bytes, self.max_body_bytes)
        return self.max_body_bytes


def is_control(method: str, path: str, all_writes: bool = False) -> bool:
    """Whether a call counts against the control rate limits: a write that creates
    commands or orders, or, with ``all_writes``, any write under /api/v1."""
    if method not in WRITE_METHODS:
        return False
    if all_writes and path.startswith("/api/v1/"):
        return True
    return CONTROL_PATH.match(path) is not None


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; time is an argument."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is one."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def give_back(self) -> None:
        """Return the token just taken (another limit refused the call)."""
        self.tokens = min(self.burst, self.tokens + 1.0)


def address_key(host: str | None) -> str:
    """What the failed-authentication limiter counts by: the IPv4 address, the /64 of
    an IPv6 one (an IPv4-mapped one as IPv4), else the host as given."""
    if not host:
        return "unknown"
    address = peer_address(host)
    if address is None:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _Address:
    """A source address's failed authentications and its block."""

    __slots__ = ("blocked_until", "bucket")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.blocked_until = 0.0


class FailedAuthLimiter:
    """Failed authentications per source address: ``per_minute`` after a burst of
    ``burst``; an address with none left is blocked for ``block_s``."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        block_s: float,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.block_s = block_s
        self.max_addresses = max_addresses
        self._entries: collections.OrderedDict[str, _Address] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def blocked(self, address: str, now: float) -> float:
        """Seconds left of the address's block; 0.0 when it is not blocked."""
        entry = self._entries.get(address)
        if entry is None:
            return 0.0
        self._entries.move_to_end(address)
        return max(0.0, entry.blocked_until - now)

    def failed(self, address: str, now: float) -> bool:
        """Count a failed authentication; True when it starts a block."""
        entry = self._entries.get(address)
        if entry is None:
            entry = self._entries[address] = _Address(TokenBucket(self.rate, self.burst, now))
            while len(self._entries) > self.max_addresses:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(address)
        if entry.bucket.take(now) == 0.0 or entry.blocked_until > now:
            return False
        entry.blocked_until = now + self.block_s
        return True


class ControlLimiter:
    """Control calls per key and for all keys, the rates divided among ``workers``."""

    def __init__(
        self,
        per_key: float,
        per_key_burst: int,
        overall: float,
        workers: int = 1,
        max_keys: int = MAX_KEYS,
    ) -> None:
        workers = max(1, workers)
        self.per_key = per_key / workers
        self.per_key_burst = max(1.0, per_key_burst / workers)
        self.overall = overall / workers
        self.max_keys = max_keys
        self._keys: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self._logged: dict[str, float] = {}
        self._global: TokenBucket | None = None

    def take(self, key: str, now: float) -> tuple[str, float] | None:
        """Count a call by ``key``: None when allowed, else (the limit that refused it,
        ``key`` or ``global``; seconds until a call would be allowed)."""
        bucket = None
        if self.per_key > 0:
            bucket = self._keys.get(key)
            if bucket is None:
                bucket = self._keys[key] = TokenBucket(self.per_key, self.per_key_burst, now)
                while len(self._keys) > self.max_keys:
                    gone, _ = self._keys.popitem(last=False)
                    self._logged.pop(gone, None)
            else:
                self._keys.move_to_end(key)
            wait = bucket.take(now)
            if wait:
                return "key", wait
        if self.overall > 0:
            if self._global is None:
                self._global = TokenBucket(self.overall, max(1.0, self.overall), now)
            wait = self._global.take(now)
            if wait:
                if bucket is not None:
                    bucket.give_back()
                return "global", wait
        return None

    def should_log(self, key: str, now: float) -> bool:
        """Whether to log that ``key`` was limited (once per :data:`LOG_EVERY_S`)."""
        if now < self._logged.get(key, -math.inf):
            return False
        self._logged[key] = now + LOG_EVERY_S
        return True
