"""Webhook delivery: signing, a small HTTP/1.1 client, and the per-process engine that
claims due deliveries, sends them and records the outcomes (the SQL and the state machine
are :mod:`chargegw.domain.webhooks`).

The contract, in a few lines:

- Requests follow Standard Webhooks: ``webhook-id`` (``evt_<event id>``, ``ping_<delivery
  id>``; the same on every attempt), ``webhook-timestamp`` (unix seconds of the attempt),
  ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>`` with the
  secret's bytes; during a rotation's overlap a second one, with the previous secret,
  after a space). The body is ``{"type", "timestamp", "data"}``, the same bytes on every
  attempt.
- One connection per attempt (``Connection: close``): connect, send, read the status
  line, the headers and at most :data:`MAX_RESPONSE_BYTES` of body, close. The
  subscription's ``timeout_s`` bounds the whole attempt, name resolution included.
  Redirects are not followed (a 3xx is a failure); a longer body is a failure
  (``too_large``) read no further; 410 Gone disables the subscription.
- Targets on private, loopback, link-local or multicast addresses are refused unless
  ``webhooks_allow_private``: the URL is checked when a subscription is written, and the
  addresses it resolves to again at every attempt (DNS rebinding), connecting only to an
  address that passed.
- Each attempt runs in its own task, at most ``max_in_flight`` per process; a receiver
  that hangs or sends 10 MB holds one task until its timeout and nothing else.
  Outcomes are written in batches; a write that fails (the database is away) is kept and
  retried. A process that dies leaves its claims to run out: another process attempts
  them again with the same ``webhook-id`` (at least once).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import enum
import functools
import hashlib
import hmac
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog

from chargegw.config import Settings, parse_schedule
from chargegw.domain import webhooks
from chargegw.domain.events import event_json
from chargegw.domain.webhooks import Attempt, Claimed, WebhookEvent
from chargegw.metrics import Metrics
from chargegw.store.errors import is_unavailable, reason

log = structlog.get_logger("chargegw.domain.webhook_delivery")

__all__ = [
    "MAX_RESPONSE_BYTES",
    "DeliveryError",
    "HttpAnswer",
    "ResponseError",
    "ResponseParser",
    "Target",
    "UrlError",
    "WebhookEngine",
    "WebhookSettings",
    "address_refusal",
    "check_url",
    "event_body",
    "parse_url",
    "post",
    "sign",
    "signature_header",
]

#: the longest response body read; a longer one is a failure (``too_large``)
MAX_RESPONSE_BYTES = 64 * 1024
#: the longest status line and headers of a response
MAX_RESPONSE_HEAD = 16 * 1024
#: of the body, this much is kept (the ledger stores 1 KiB of it)
KEPT_BODY_BYTES = 4096
#: the longest URL a subscription may have
MAX_URL_CHARS = 2048


# ---------------------------------------------------------------- signing


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` keyed with the secret's bytes."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per secret, separated by spaces."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(WebhookEvent))


def event_body(event: WebhookEvent) -> bytes:
    """The request body of an event: ``{"type", "timestamp", "data"}``, ``data`` being
    the event's one JSON shape (:func:`chargegw.domain.events.event_json`), ``timestamp``
    its time."""
    data = event_json({name: getattr(event, name) for name in _EVENT_FIELDS})
    return _dumps({"type": event.type, "timestamp": data["at"], "data": data})


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# ---------------------------------------------------------------- targets


class UrlError(ValueError):
    """A webhook URL that cannot be used (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a webhook URL points."""

    scheme: str
    #: the host name (IDNA) or address, without brackets
    host: str
    port: int
    #: path and query, as sent on the request line
    path: str
    #: the host as an address, when it is one (nothing to resolve)
    address: IPAddress | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


@functools.lru_cache(maxsize=1024)
def parse_url(url: str) -> Target:
    """The target of an http(s) URL with a host and no user info; :class:`UrlError`
    otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise UrlError(f"longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UrlError("contains white space or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlError(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlError("only http and https URLs are allowed")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UrlError(
            "user info (user:password@) is not allowed; authenticate the signature instead"
        )
    host = parts.hostname
    if not host:
        raise UrlError("no host")
    if parts.fragment:
        raise UrlError("a fragment (#...) is not sent to a server; remove it")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise UrlError("the host name is not valid") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not path.isascii():  # the request line is ASCII: percent-encode the rest
        raise UrlError("the path or query has characters outside ASCII: percent-encode them")
    try:
        address: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path, address)


def address_refusal(address: IPAddress) -> str | None:
    """Why a webhook may not be sent to ``address`` (None: it is a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            refusal = address_refusal(embedded)
            if refusal is not None and address.ipv4_mapped is None:
                return f"{refusal} (inside {address})"
            if refusal is not None:
                return refusal
            address = embedded
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a public address"
    return None


#: IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, IPv4-compatible)
_IPV4_IN_LAST_32 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::/96"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through a translator (mapped, NAT64,
    IPv4-compatible, 6to4, Teredo), which must pass the same rules."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _IPV4_IN_LAST_32) and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


#: name lookups of webhook hosts run on their own threads: a receiver whose DNS hangs
#: holds these, not the default executor the database driver and the API use
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")


async def _resolve(target: Target) -> list[IPAddress]:
    """The addresses the target's host resolves to, in the resolver's order (an address
    stays one)."""
    if target.address is not None:
        return [target.address]
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(
        _RESOLVER,
        functools.partial(socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM),
    )
    seen: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    return seen


async def check_url(url: str, *, allow_private: bool, timeout_s: float = 5.0) -> Target:
    """:func:`parse_url`, then, unless ``allow_private``, the host's addresses: any that
    is not public is a :class:`UrlError` (so is a name that does not resolve)."""
    target = parse_url(url)
    if allow_private:
        return target
    try:
        async with asyncio.timeout(timeout_s):
            addresses = await _resolve(target)
    except (OSError, TimeoutError):
        raise UrlError(f"the host {target.host} does not resolve") from None
    for address in addresses:
        why = address_refusal(address)
        if why is not None:
            what = target.host if str(address) == target.host else f"{target.host} ({address})"
            raise UrlError(
                f"{what} is {why}; private, loopback, link-local and multicast targets "
                "need the setting webhooks_allow_private"
            )
    return target


# ---------------------------------------------------------------- responses (sans-IO)


class ResponseError(Exception):
    """The receiver's answer cannot be used; ``reason`` is a stable word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Stage(enum.Enum):
    HEAD = "head"
    LENGTH = "length"
    UNTIL_CLOSE = "until_close"
    CHUNK_SIZE = "chunk_size"
    CHUNK_DATA = "chunk_data"
    CHUNK_END = "chunk_end"
    TRAILERS = "trailers"
    DONE = "done"


class ResponseParser:
    """An HTTP/1.1 response, fed in pieces: no sockets, no clock.

    :meth:`feed` the bytes as they come and :meth:`closed` when the peer closes; both
    answer whether the response is complete. Interim (1xx) responses are skipped. The
    head is bounded (``max_head``), and so is the body (``max_body``: a
    ``ResponseError("too_large")`` as soon as it is known to be longer, from
    ``Content-Length`` or from the bytes). Of the body, ``keep`` bytes are kept.
    """

    def __init__(
        self,
        *,
        max_head: int = MAX_RESPONSE_HEAD,
        max_body: int = MAX_RESPONSE_BYTES,
        keep: int = KEPT_BODY_BYTES,
    ) -> None:
        self.max_head = max_head
        self.max_body = max_body
        self.keep = keep
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.received = 0
        self._stage = _Stage.HEAD
        self._buffer = bytearray()
        self._remaining = 0

    @property
    def done(self) -> bool:
        return self._stage is _Stage.DONE

    def feed(self, data: bytes) -> bool:
        """Take bytes of the response; True once it is complete."""
        self._buffer += data
        while self._step():
            pass
        return self.done

    def closed(self) -> bool:
        """The peer closed the connection: True if that completes the response (a body
        delimited by the close); ``ResponseError("closed")`` if it cut it short."""
        if self._stage is _Stage.UNTIL_CLOSE:
            self._stage = _Stage.DONE
        if self.done:
            return True
        if self._stage is _Stage.HEAD:
            raise ResponseError("closed", "the connection closed before an answer")
        raise ResponseError("closed", "the connection closed in the middle of the body")

    def _step(self) -> bool:
        """One step of parsing; False when it needs more bytes (or is done)."""
        stage = self._stage
        buffer = self._buffer
        if stage is _Stage.HEAD:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > self.max_head:
                    raise ResponseError("protocol", "the response head is too long")
                return False
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            self._head(head)
            return True
        if stage is _Stage.LENGTH:
            take = min(self._remaining, len(buffer))
            self._body(buffer[:take])
            del buffer[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._stage = _Stage.DONE
            return False
        if stage is _Stage.UNTIL_CLOSE:
            self._body(buffer)
            buffer.clear()
            return False
        if stage is _Stage.CHUNK_SIZE:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 1024:
                    raise ResponseError("protocol", "a chunk size line is too long")
                return False
            line = bytes(buffer[:end]).split(b";", 1)[0].strip()
            del buffer[: end + 2]
            try:
                size = int(line, 16)
            except ValueError:
                raise ResponseError("protocol", "a malformed chunk size") from None
            if size < 0:
                raise ResponseError("protocol", "a malformed chunk size")
            if size == 0:
                self._stage = _Stage.TRAILERS
            else:
                if self.received + size > self.max_body:
                    raise ResponseError("too_large", self._too_large())
                self._remaining = size
                self._stage = _Stage.CHUNK_DATA
            return True
        if stage is _Stage.CHUNK_DATA:
            take = min(self._remaining, len(buffer))
            self._body(buffer[:take])
            del buffer[:take]
            self._remaining -= take
            if self._remaining:
                return False
            self._stage = _Stage.CHUNK_END
            return True
        if stage is _Stage.CHUNK_END:
            if len(buffer) < 2:
                return False
            if buffer[:2] != b"\r\n":
                raise ResponseError("protocol", "a chunk is not followed by CRLF")
            del buffer[:2]
            self._stage = _Stage.CHUNK_SIZE
            return True
        if stage is _Stage.TRAILERS:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > self.max_head:
                    raise ResponseError("protocol", "the trailers are too long")
                return False
            del buffer[: end + 2]
            if end == 0:
                self._stage = _Stage.DONE
            return not self.done
        return False

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ResponseError("protocol", "not an HTTP/1.x status line")
        try:
            status = int(parts[1])
        except ValueError:
            raise ResponseError("protocol", "a malformed status code") from None
        if not 100 <= status <= 999 or len(parts[1]) != 3:
            raise ResponseError("protocol", "a malformed status code")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name.strip():
                raise ResponseError("protocol", "a malformed header line")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): the answer follows
            return
        self.status = status
        self.headers = headers
        if status in (204, 304):
            self._stage = _Stage.DONE
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._stage = _Stage.CHUNK_SIZE
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise ResponseError("protocol", "a malformed Content-Length") from None
            if length < 0:
                raise ResponseError("protocol", "a malformed Content-Length")
            if length > self.max_body:
                raise ResponseError("too_large", self._too_large(length))
            self._remaining = length
            self._stage = _Stage.LENGTH if length else _Stage.DONE
        else:
            self._stage = _Stage.UNTIL_CLOSE

    def _body(self, data: bytes | bytearray) -> None:
        if not data:
            return
        self.received += len(data)
        if self.received > self.max_body:
            raise ResponseError("too_large", self._too_large())
        room = self.keep - len(self.body)
        if room > 0:
            self.body += data[:room]

    def _too_large(self, length: int | None = None) -> str:
        what = f"{length} bytes" if length is not None else "more"
        return (
            f"the response body is {what}, larger than {self.max_body} bytes (status {self.status})"
        )


# ---------------------------------------------------------------- the client


@dataclasses.dataclass(frozen=True)
class HttpAnswer:
    """A receiver's answer: status, headers (lower-case names), the start of the body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class DeliveryError(Exception):
    """An attempt that got no usable answer; ``reason`` is a stable word (timeout,
    connect, dns, tls, private_address, closed, protocol, too_large)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _request(target: Target, headers: Mapping[str, str], body: bytes) -> bytes:
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Exchange(asyncio.Protocol):
    """One request on one connection: sends it once connected, feeds the answer to a
    :class:`ResponseParser`, and resolves ``done`` when the answer is complete (or with
    the error that ended it). A plain protocol, no streams: the per-attempt cost matters
    at thousands of deliveries a second."""

    def __init__(self, request: bytes, parser: ResponseParser) -> None:
        self.request = request
        self.parser = parser
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            if self.parser.feed(data):
                self.done.set_result(None)
        except ResponseError as exc:
            self.done.set_exception(exc)

    def eof_received(self) -> bool:
        self._closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.done.done():
            self.done.set_exception(ResponseError("closed", f"the connection failed: {exc}"))
        self._closed()

    def _closed(self) -> None:
        if self.done.done():
            return
        try:
            self.parser.closed()
            self.done.set_result(None)
        except ResponseError as exc:
            self.done.set_exception(exc)


async def _exchange(
    target: Target,
    request: bytes,
    parser: ResponseParser,
    *,
    allow_private: bool,
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Send ``request`` to the first of the target's addresses that is allowed and
    answers, and read the answer into ``parser``."""
    try:
        addresses = await _resolve(target)
    except OSError as exc:
        raise DeliveryError("dns", f"{target.host} does not resolve: {exc}") from None
    allowed = addresses
    if not allow_private:
        allowed = [a for a in addresses if address_refusal(a) is None]
        if not allowed:
            shown = ", ".join(map(str, addresses))
            raise DeliveryError(
                "private_address",
                f"{target.host} resolves only to addresses that are not public ({shown}); not sent",
            )
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for address in allowed:
        exchange = _Exchange(request, parser)
        try:
            transport, _ = await loop.create_connection(
                lambda exchange=exchange: exchange,
                str(address),
                target.port,
                ssl=ssl_context if target.tls else None,
                server_hostname=target.host if target.tls else None,
            )
        except ssl.SSLError as exc:
            raise DeliveryError("tls", f"TLS with {target.host} failed: {exc}") from None
        except OSError as exc:
            last = exc
            continue
        try:
            await exchange.done
        finally:
            transport.abort()
        return
    what = f"cannot connect to {target.host}:{target.port}"
    raise DeliveryError("connect", f"{what}: {last.strerror or last}" if last else what)


async def post(
    target: Target,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    allow_private: bool,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpAnswer:
    """POST ``body`` to ``target`` on a new connection and read the answer (see the
    module docstring); :class:`DeliveryError` when there is none to use."""
    parser = ResponseParser()
    try:
        async with asyncio.timeout(timeout_s):
            await _exchange(
                target,
                _request(target, headers, body),
                parser,
                allow_private=allow_private,
                ssl_context=ssl_context,
            )
    except TimeoutError:
        stage = "an answer" if parser.status is None else "the rest of the answer"
        raise DeliveryError("timeout", f"no {stage} within {timeout_s:g} s") from None
    except ResponseError as exc:
        raise DeliveryError(exc.reason, str(exc)) from None
    except ssl.SSLError as exc:
        raise DeliveryError("tls", f"TLS failed: {exc}") from None
    except OSError as exc:
        raise DeliveryError("connect", f"the connection failed: {exc}") from None
    assert parser.status is not None
    return HttpAnswer(parser.status, parser.headers, bytes(parser.body))


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now, 0.0)


def _classify(status: int) -> str | None:
    """The failure reason of an HTTP status (None: a success)."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return "redirect"
    if status == 410:
        return "gone"
    if 400 <= status < 500:
        return "status_4xx"
    if 500 <= status < 600:
        return "status_5xx"
    return "protocol"


# ---------------------------------------------------------------- the engine


@dataclasses.dataclass(frozen=True)
class WebhookSettings:
    """How the engine delivers; :meth:`from_settings` is the one place that reads them
    from the application's settings."""

    #: private, loopback, link-local and multicast targets are allowed
    allow_private: bool = False
    #: due deliveries are looked for at least this often (new events wake the engine)
    poll_s: float = 1.0
    #: seconds before attempt 2, 3 ...; the last entry repeats
    retry_schedule_s: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 10800)
    #: a delivery this old is given up after a failed attempt; a subscription failing
    #: this long is disabled
    disable_after_s: float = 3 * 86400
    #: finished deliveries are deleted this long after they finished
    retention_s: float = 7 * 86400
    #: attempts in flight in this process
    max_in_flight: int = 256
    #: a claim lasts the subscription's timeout plus this (then another process may try)
    lease_margin_s: float = 30.0
    #: orphaned queues, the backlog gauge and the retention sweep, this often
    housekeeping_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSettings:
        """The engine's share of the application's settings."""
        return cls(
            allow_private=settings.webhooks_allow_private,
            poll_s=settings.webhooks_poll_s,
            retry_schedule_s=parse_schedule(settings.webhooks_retry_schedule_s),
            disable_after_s=settings.webhooks_disable_after_s,
            retention_s=settings.webhooks_retention_days * 86400,
            max_in_flight=settings.webhooks_max_in_flight,
            lease_margin_s=settings.webhooks_lease_margin_s,
        )


#: retention sweeps of several processes do not overlap
_PURGE_LOCK = 0x57484B53  # "WHKS"
#: how the engine's connection runs claims and outcomes, while it holds it (the pool's
#: reset on release, RESET ALL, ends it): committed without waiting for the disk (a crash
#: of PostgreSQL may forget the last few, which at worst sends a delivery once more; the
#: delivery rows themselves are written with their events, durably), and planned for
#: each execution (a generic plan made while the table was small scanned whole queues
#: when a burst came: 200 ms a claim instead of 10)
_SESSION = "SET synchronous_commit TO off; SET plan_cache_mode TO force_custom_plan"
#: a queue whose head finished is looked at again after these many seconds (a row
#: written behind the head in a transaction still open then may wait unpromoted)
_RECHECK_S = (0.3, 3.0)
_RECHECK_EVERY_S = 0.1
#: outcomes written per statement (or transaction) by the finisher, at most
_FINISH_BATCH = 500
#: the finisher waits this long for more outcomes before it writes
_FINISH_LINGER_S = 0.01


class WebhookEngine:
    """The per-process delivery engine: :meth:`start`, :meth:`wake` on new events,
    :meth:`close` (after draining, if asked)."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | None],
        metrics: Metrics,
        settings: WebhookSettings,
        *,
        owner: str,
        user_agent: str,
    ) -> None:
        self._pool = pool
        self.metrics = metrics
        self.settings = settings
        #: this process's id in the session directory; claims carry it
        self.owner = owner
        self.user_agent = user_agent
        #: while draining, nothing new is claimed
        self.draining = False
        self._ssl = ssl.create_default_context()
        self._due = asyncio.Event()
        self._results: list[Attempt] = []
        self._results_ready = asyncio.Event()
        self._flying: set[asyncio.Task[None]] = set()
        self._loops: set[asyncio.Task[None]] = set()
        self._finisher_task: asyncio.Task[None] | None = None
        self._success = webhooks.SuccessCache()
        self._backlog_labels: set[str] = set()
        self._unavailable = False
        self._closed = False
        self._last_purge = float("-inf")
        #: queues whose head finished, to look at again (when, and how many times more)
        self._recheck: dict[tuple[int, str], tuple[float, int]] = {}

    # -- lifecycle --

    def start(self) -> None:
        """Start claiming, finishing and housekeeping."""
        loop = asyncio.get_running_loop()
        for coro, name in (
            (self._claimer(), "webhooks-claimer"),
            (self._housekeeper(), "webhooks-housekeeping"),
            (self._rechecker(), "webhooks-recheck"),
        ):
            task = loop.create_task(coro, name=name)
            self._loops.add(task)
            task.add_done_callback(self._loops.discard)
        self._finisher_task = loop.create_task(self._finisher(), name="webhooks-finisher")
        self._due.set()

    def wake(self, last_event_id: int = 0) -> None:
        """New events were sequenced (or a delivery was made due): look for work now."""
        self._due.set()

    @property
    def in_flight(self) -> int:
        """Attempts running in this process now."""
        return len(self._flying)

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop claiming; let the attempts in flight finish for up to ``grace_s`` (the
        others are cut: their claims run out and another process tries again), write the
        outcomes, stop."""
        if self._closed:
            return
        self._closed = True
        self.draining = True
        for task in list(self._loops):
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._flying and grace_s > 0:
            await asyncio.wait(list(self._flying), timeout=grace_s)
        for task in list(self._flying):
            task.cancel()
        await asyncio.gather(*self._flying, return_exceptions=True)
        # the finisher stops before the last write: one writer of the results at a time
        if self._finisher_task is not None:
            self._finisher_task.cancel()
            await asyncio.gather(self._finisher_task, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                while self._results:
                    await self._write_results()

    # -- claiming --

    async def _claimer(self) -> None:
        backoff = 0.5
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_s):
                    await self._due.wait()
            self._due.clear()
            free = self.settings.max_in_flight - len(self._flying)
            pool = self._pool()
            if self.draining or free <= 0 or pool is None:
                continue
            try:
                async with pool.acquire(timeout=5) as conn:
                    await conn.execute(_SESSION)
                    claimed = await webhooks.claim(
                        conn,
                        self.owner,
                        limit=free,
                        lease_margin_s=self.settings.lease_margin_s,
                    )
            except Exception as exc:
                self._database_failed(exc, "claiming webhook deliveries")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            self._database_back()
            loop = asyncio.get_running_loop()
            for item in claimed:
                task = loop.create_task(self._attempt(item), name=f"webhook-{item.delivery_id}")
                self._flying.add(task)
                task.add_done_callback(self._landed)
            self.metrics.webhook_in_flight.set(len(self._flying))

    def _landed(self, task: asyncio.Task[None]) -> None:
        was_full = len(self._flying) >= self.settings.max_in_flight
        self._flying.discard(task)
        self.metrics.webhook_in_flight.set(len(self._flying))
        if was_full:
            self._due.set()

    # -- one attempt --

    def _body(self, item: Claimed) -> bytes:
        if item.event is not None:
            return event_body(item.event)
        payload = item.payload or {}  # a ping: the keys in the order of an event's body
        return _dumps({key: payload.get(key) for key in ("type", "timestamp", "data")})

    async def _attempt(self, item: Claimed) -> None:
        try:
            result = await self._send(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect must not lose the claim's outcome
            log.exception("webhook attempt failed unexpectedly", delivery_id=item.delivery_id)
            result = self._failed(item, "internal", f"internal error: {exc!r}", None, None, None)
        self.metrics.webhook_attempts_total.labels(result=result.reason or "delivered").inc()
        self._results.append(result)
        self._results_ready.set()

    async def _send(self, item: Claimed) -> Attempt:
        if item.event_gone or item.webhook_id is None:
            return Attempt(
                item.delivery_id,
                item.subscription_id,
                item.attempt,
                ok=False,
                reason="cancelled",
                cancel=True,
            )
        body = self._body(item)
        timestamp = int(time.time())
        headers = {
            "User-Agent": self.user_agent,
            "webhook-id": item.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(item.secrets, item.webhook_id, timestamp, body),
        }
        started = time.monotonic()
        try:
            target = parse_url(item.url)
            answer = await post(
                target,
                body,
                headers,
                timeout_s=item.timeout_s,
                allow_private=self.settings.allow_private,
                ssl_context=self._ssl,
            )
        except UrlError as exc:
            return self._failed(
                item, "invalid_url", f"the URL cannot be used: {exc}", None, None, None
            )
        except DeliveryError as exc:
            latency = (time.monotonic() - started) * 1000
            return self._failed(item, exc.reason, str(exc), None, None, latency)
        latency = (time.monotonic() - started) * 1000
        text = answer.body.decode("utf-8", "replace")
        failure = _classify(answer.status)
        if failure is None:
            if item.event is not None:
                self.metrics.webhook_delivery_latency_seconds.observe(
                    max(time.time() - item.event.at.timestamp(), 0.0)
                )
            return Attempt(
                item.delivery_id,
                item.subscription_id,
                item.attempt,
                ok=True,
                response_status=answer.status,
                response_body=text,
                latency_ms=latency,
            )
        if failure == "redirect":
            where = answer.headers.get("location", "nowhere")
            error = f"HTTP {answer.status}: a redirect to {where} (redirects are not followed)"
        elif failure == "gone":
            error = "HTTP 410 Gone: the receiver asked to stop; the subscription is disabled"
        else:
            error = f"HTTP {answer.status}"
        wait = retry_after(answer.headers.get("retry-after"), time.time())
        return self._failed(item, failure, error, answer.status, text, latency, retry_after_s=wait)

    def _failed(
        self,
        item: Claimed,
        why: str,
        error: str,
        status: int | None,
        body: str | None,
        latency_ms: float | None,
        *,
        retry_after_s: float | None = None,
    ) -> Attempt:
        delay = webhooks.next_delay(
            item.attempt, self.settings.retry_schedule_s, retry_after_s=retry_after_s
        )
        return Attempt(
            item.delivery_id,
            item.subscription_id,
            item.attempt,
            ok=False,
            reason=why,
            error=f"{why}: {error}",
            response_status=status,
            response_body=body,
            latency_ms=latency_ms,
            delay_s=delay,
            gone=why == "gone",
        )

    # -- finishing --

    async def _finisher(self) -> None:
        backoff = 0.5
        while True:
            await self._results_ready.wait()
            if len(self._results) < _FINISH_BATCH:  # a moment for more to join the batch
                await asyncio.sleep(_FINISH_LINGER_S)
            self._results_ready.clear()
            try:
                while self._results:
                    await self._write_results()
            except Exception as exc:
                self._database_failed(exc, "recording webhook attempts")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._results_ready.set()
                continue
            backoff = 0.5
            self._database_back()

    async def _write_results(self) -> None:
        """Write one batch of outcomes; on failure they stay for the next try."""
        batch = self._results[:_FINISH_BATCH]
        pool = self._pool()
        if pool is None:
            raise ConnectionError("no database pool")
        async with pool.acquire(timeout=5) as conn:
            await conn.execute(_SESSION)
            done = await webhooks.finish(
                conn,
                self.owner,
                batch,
                disable_after_s=self.settings.disable_after_s,
                success_cache=self._success,
                now=time.monotonic(),
            )
        del self._results[: len(batch)]
        self._recorded(done)
        self._due.set()  # the next rows of those queues are due, and the slots free

    def _recorded(self, done: webhooks.Finished) -> None:
        due = time.monotonic() + _RECHECK_S[0]
        for queue in done.queues:
            self._recheck[queue] = (due, len(_RECHECK_S) - 1)
        counter = self.metrics.webhook_deliveries_total
        if done.delivered:
            counter.labels(result="delivered").inc(len(done.delivered))
        if done.given_up:
            counter.labels(result="failed").inc(len(done.given_up))
            log.warning(
                "webhook deliveries given up",
                deliveries=done.given_up[:20],
                count=len(done.given_up),
            )
        if done.cancelled:
            counter.labels(result="cancelled").inc(len(done.cancelled))
        if done.stale:
            log.info(
                "webhook outcomes not recorded: the claims are no longer this process's"
                " (taken over after their lease ran out, or recorded already)",
                deliveries=done.stale[:20],
                count=len(done.stale),
            )
        for subscription_id, why in done.disabled:
            self.metrics.webhook_subscriptions_disabled_total.labels(reason=why).inc()
            log.warning(
                "webhook subscription disabled", subscription_id=subscription_id, reason=why
            )

    # -- queues whose next row was still being written --

    async def _rechecker(self) -> None:
        """A row written behind a queue's head in a transaction still open when the head
        finished waits ``queued`` with nobody to promote it: look at those queues again a
        moment later, and once more later still (the housekeeping sweep catches the rest)."""
        while True:
            await asyncio.sleep(_RECHECK_EVERY_S)
            now = time.monotonic()
            due = [q for q, (when, _) in self._recheck.items() if when <= now]
            pool = self._pool()
            if not due or pool is None:
                continue
            try:
                async with pool.acquire(timeout=5) as conn:
                    promoted = await webhooks.promote_queues(conn, due)
            except Exception as exc:
                self._database_failed(exc, "looking at finished queues again")
                continue
            for queue in due:
                left = self._recheck[queue][1]
                if left:
                    delay = _RECHECK_S[len(_RECHECK_S) - left]
                    self._recheck[queue] = (now + delay, left - 1)
                else:
                    del self._recheck[queue]
            if promoted:
                self._due.set()

    # -- housekeeping --

    async def _housekeeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.housekeeping_s)
            try:
                await self.housekeeping()
            except Exception as exc:
                self.metrics.housekeeping_failed("webhook_deliveries")
                self._database_failed(exc, "webhook housekeeping")

    async def housekeeping(self) -> None:
        """Promote orphaned queues, refresh the backlog gauge, and (at most every
        minute, one process at a time) delete finished deliveries past retention."""
        pool = self._pool()
        if pool is None:
            return
        async with pool.acquire(timeout=5) as conn:
            promoted = await webhooks.promote_orphans(conn)
            if promoted:
                log.info("webhook queues resumed", count=promoted)
                self._due.set()
            counts = await webhooks.backlog(conn)
        labels = {str(k): v for k, v in counts.items()}
        for label in self._backlog_labels - labels.keys():
            # with several workers (multiprocess mode) removing a label leaves its last
            # value in the shared files: it reads 0 there instead of vanishing
            self.metrics.webhook_backlog.labels(subscription_id=label).set(0)
            with contextlib.suppress(KeyError):
                self.metrics.webhook_backlog.remove(label)
        for label, count in labels.items():
            self.metrics.webhook_backlog.labels(subscription_id=label).set(count)
        self._backlog_labels = set(labels)
        now = time.monotonic()
        if now - self._last_purge >= 60:
            self._last_purge = now
            await self.purge()

    async def purge(self) -> int:
        """Delete finished deliveries older than the retention, in batches; 0 if another
        process is at it."""
        pool = self._pool()
        if pool is None:
            return 0
        total = 0
        async with pool.acquire(timeout=5) as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _PURGE_LOCK):
                self.metrics.housekeeping_done("webhook_deliveries")  # another one is at it
                return 0
            try:
                while True:
                    deleted = await webhooks.purge(
                        conn, older_than_s=self.settings.retention_s, batch=5000
                    )
                    total += deleted
                    if deleted < 5000:
                        break
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _PURGE_LOCK)
        if total:
            log.info("finished webhook deliveries deleted", count=total)
        self.metrics.housekeeping_done("webhook_deliveries", deleted=total)
        return total

    # -- the database --

    def _database_failed(self, exc: BaseException, doing: str) -> None:
        if is_unavailable(exc) or isinstance(exc, ConnectionError):
            if not self._unavailable:
                self._unavailable = True
                log.warning(
                    "database unavailable for webhooks, retrying", doing=doing, reason=reason(exc)
                )
        else:
            log.error("webhook engine step failed", doing=doing, error=repr(exc))

    def _database_back(self) -> None:
        if self._unavailable:
            self._unavailable = False
            log.info("database available again for webhooks")
