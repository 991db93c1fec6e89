"""Request hygiene of the HTTP API: body sizes, failed authentications per source address,
rate limits of control calls, and the audit trail of calls (docs/partners.md, "Limits"
and "Audit").

:func:`install` puts four ASGI middlewares around an application, outermost first:

- :class:`InFlightMiddleware`: a process serving ``http_max_in_flight`` requests answers
  the next one 503 ``busy`` with ``Retry-After: 1`` at once, so an API overload is refused
  cheaply instead of queueing on the event loop the devices' frames share. A request is
  in progress until its answer starts (an event stream holds no slot). Health,
  readiness and metrics are always served.
- :class:`CallAuditMiddleware` gives every answer an ``X-Request-Id`` and records the
  calls to audit (:func:`audited`) through :class:`~chargegw.domain.call_audit.CallAuditWriter`
  before their answer is sent: every call that is not GET/HEAD/OPTIONS made with a key
  that passed the check, and every refused authentication (401/403 from the key check).
  Requests refused before their key is checked (an unknown path, a body too large or not
  JSON) are not recorded: they act on nothing and carry no identity; 429s are counted by
  ``chargegw_api_rate_limited_total`` instead.
- :class:`FailedAuthMiddleware`: a token bucket per source address (an IPv6 address counts
  by its /64) takes one token per 401; an address that runs out is answered 429
  ``rate_limited`` (``scope: auth``) for ``auth_block_s`` without its key being checked,
  so guessing keys costs the gateway nothing. The open paths (health, metrics, docs) stay
  open. Per process, in memory, for at most 10,000 addresses (least recently seen
  forgotten first: :mod:`chargegw.api.limits`).
- :class:`BodyLimitMiddleware`: a ``Content-Length`` above the limit is answered 413
  before the body is read; a body without one (chunked) is counted as it is read and
  refused with 413 once it passes the limit. The limit is ``http_max_body_bytes``, and
  ``firmware_max_bytes`` for the firmware upload.

The control-call rate limits run as a dependency, :func:`admit`, right after the key
check (so only authenticated calls count, and by the key's identity): a token bucket per
key and one for all keys, each ``rate / workers`` per second in each worker process of
a node; the division spares every call a database round trip and a hot row, at the
price that a client on a single keep-alive connection (which stays with one worker)
gets 1/workers of its rate. Refusals are 429 ``rate_limited`` with ``Retry-After``
(``scope``: ``key`` or ``global``).

The source address is the ASGI client address: behind a reverse proxy, uvicorn takes it
from ``X-Forwarded-For`` when the proxy's address is in ``FORWARDED_ALLOW_IPS``
(127.0.0.1 by default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import FastAPI, HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chargegw import causes
from chargegw.api import errors
from chargegw.api.limits import (
    SAFE_METHODS,
    ControlLimiter,
    FailedAuthLimiter,
    HttpLimits,
    address_key,
    is_control,
)
from chargegw.causes import Cause
from chargegw.domain import auth, call_audit
from chargegw.domain.call_audit import CallAuditWriter, CallRecord

if TYPE_CHECKING:
    from chargegw.api.app import ApiState

__all__ = [
    "RESPONSES",
    "BodyLimitMiddleware",
    "BodyTooLargeError",
    "CallAuditMiddleware",
    "FailedAuthMiddleware",
    "Guard",
    "HttpLimits",
    "admit",
    "audited",
    "fingerprint",
    "install",
]

log = structlog.get_logger("chargegw.api.guard")

#: the request and answer bytes kept to read a JSON body for the audit row
CAPTURE_LIMIT = 64 * 1024
#: served whatever the load: what monitoring and orchestrators ask
_ALWAYS_SERVED = ("/healthz", "/readyz", "/metrics")
#: paths open without a key; blocked addresses still reach them
OPEN_PATHS = (*_ALWAYS_SERVED, "/openapi.json", "/docs", "/redoc", "/static")
#: what :func:`admit` and the middlewares note in the request's state
AUTHENTICATED = "chargegw_authenticated"
AUTH_BLOCKED = "chargegw_auth_blocked"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_RATE_LIMITED = "rate_limited"

#: the OpenAPI ``responses`` of 413 and 429, for every protected route
RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {
        "model": errors.ErrorResponse,
        "description": "The request body is larger than allowed (`http_max_body_bytes`)",
    },
    429: {
        "model": errors.ErrorResponse,
        "description": "Too many requests: control calls over the key's or the gateway's "
        "rate, or too many failed authentications from the address (`code`: "
        "`rate_limited`, `scope`: `key`, `global` or `auth`)",
        "headers": {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer"},
            }
        },
    },
}


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass
class Guard:
    """The hygiene of one API application: its limits, their state, the audit writer
    (None: calls are not audited). ``clock`` and ``wall`` are injectable for tests."""

    limits: HttpLimits = dataclasses.field(default_factory=HttpLimits)
    audit: CallAuditWriter | None = None
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], dt.datetime] = _utc_now
    auth_failures: FailedAuthLimiter | None = dataclasses.field(init=False)
    control: ControlLimiter = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        limits = self.limits
        self.auth_failures = None
        if limits.auth_failures_per_minute > 0:
            self.auth_failures = FailedAuthLimiter(
                limits.auth_failures_per_minute, limits.auth_failure_burst, limits.auth_block_s
            )
        self.control = ControlLimiter(
            limits.control_rate_per_key,
            limits.control_burst_per_key,
            limits.control_rate_global,
            limits.workers,
        )


# ---------------------------------------------------------------- helpers


def _api_state(scope: Scope) -> ApiState:
    state: ApiState = scope["app"].state.chargegw
    return state


def _request_state(scope: Scope) -> dict[str, Any]:
    """The request's ``request.state`` dict, made here so the routes write into it."""
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _bearer(scope: Scope) -> str | None:
    header = _header(scope, b"authorization") or ""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def fingerprint(token: str) -> str:
    """The first 16 hex digits of the key's SHA-256: the start of its stored hash."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _source(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


def _too_many(message: str, scope_name: str, wait: float) -> tuple[dict[str, Any], dict[str, str]]:
    seconds = max(1, math.ceil(wait))
    body = errors.error_body(
        429, message, code=_RATE_LIMITED, scope=scope_name, retry_after_s=seconds
    )
    return body, {"Retry-After": str(seconds)}


def _key_identity(state: dict[str, Any]) -> tuple[str | None, str | None]:
    """(id, name) of the key the check accepted or names, from ``request.state.api_key``."""
    key = state.get("api_key")
    if key is None:
        return None, None
    key_id = getattr(key, "key_id", None)
    name = getattr(key, "name", None)
    return (None if key_id is None else str(key_id)), (None if name is None else str(name))


async def _respond(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    response = errors.error_response(status, body, headers)
    await response(scope, receive, send)


# ---------------------------------------------------------------- the dependency


async def admit(request: Request) -> None:
    """After the key check of every protected route: note that the request passed it,
    and apply the control-call rate limits (429 ``rate_limited`` with ``Retry-After``)."""
    scope = request.scope
    state = _request_state(scope)
    state[AUTHENTICATED] = True
    method = request.method
    if method in SAFE_METHODS:
        return
    api = _api_state(scope)
    guard = api.guard
    if not is_control(method, scope["path"], guard.limits.all_writes):
        return
    key_id, _ = _key_identity(state)
    if key_id is None:
        token = _bearer(scope)
        key_id = f"sha256:{fingerprint(token)}" if token else "anonymous"
    now = guard.clock()
    refused = guard.control.take(key_id, now)
    if refused is None:
        return
    limit, wait = refused
    api.metrics.api_rate_limited_total.labels(scope=limit).inc()
    if guard.control.should_log(key_id if limit == "key" else "", now):
        log.warning("control calls rate limited", limit=limit, key_id=key_id, retry_after_s=wait)
    which = "this key's" if limit == "key" else "the gateway's"
    raise errors.api_error(
        429,
        f"too many control calls: over {which} rate limit; retry after {_retry_after(wait)} s",
        code=_RATE_LIMITED,
        headers={"Retry-After": _retry_after(wait)},
        scope=limit,
        retry_after_s=int(_retry_after(wait)),
    )


# ---------------------------------------------------------------- middlewares


class BodyTooLargeError(HTTPException):
    """A body passed its limit while it was read: 413 in the error shape, through the
    application's handlers (FastAPI passes an ``HTTPException`` of a body read on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_detail(limit))
        self.limit = limit


def _too_large_detail(limit: int) -> dict[str, Any]:
    return {
        "error": f"the request body is larger than {limit} bytes",
        "field": "body",
        "limit_bytes": limit,
    }


class BodyLimitMiddleware:
    """413 for a body over the limit: at once from ``Content-Length``, else while it is
    read (the read raises :class:`BodyTooLargeError`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = _api_state(scope)
        limit = api.guard.limits.body_limit(scope["method"], scope["path"])
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            api.metrics.api_body_too_large_total.inc()
            body = errors.from_detail(413, _too_large_detail(limit))
            await _respond(scope, receive, send, 413, body, {})
            return
        read = 0
        started = False
        too_large = False

        async def limited() -> Message:
            nonlocal read, too_large
            if too_large:
                raise BodyTooLargeError(limit)
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    too_large = True
                    api.metrics.api_body_too_large_total.inc()
                    raise BodyTooLargeError(limit)
            return message

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                if too_large and message["status"] != 413:
                    raise BodyTooLargeError(limit)  # a route answered otherwise: still 413
                started = True
            await send(message)

        try:
            await self.app(scope, limited, watch)
        except BodyTooLargeError:
            if started:
                raise
            body = errors.from_detail(413, _too_large_detail(limit))
            await _respond(scope, receive, send, 413, body, {})


class InFlightMiddleware:
    """503 ``busy`` past ``max_in_flight`` requests in this process (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_ALWAYS_SERVED):
            await self.app(scope, receive, send)
            return
        api = _api_state(scope)
        cap = api.guard.limits.max_in_flight
        if cap and self.in_flight >= cap:
            api.metrics.api_busy_total.inc()
            body = errors.error_body(
                503,
                f"the server is busy ({cap} requests in progress in this process); retry after 1 s",
                code="busy",
                retry_after_s=1,
            )
            await _respond(scope, receive, send, 503, body, {"Retry-After": "1"})
            return
        # in flight until the answer starts: an event stream or a download that goes on
        # sending holds no slot
        gauge = api.metrics.api_in_flight
        self.in_flight += 1
        gauge.inc()
        held = True

        async def started(message: Message) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start":
                held = False
                self.in_flight -= 1
                gauge.dec()
            await send(message)

        try:
            await self.app(scope, receive, started)
        finally:
            if held:
                self.in_flight -= 1
                gauge.dec()


class FailedAuthMiddleware:
    """429 for an address that failed authentication too often (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        api = _api_state(scope)
        guard = api.guard
        limiter = guard.auth_failures
        if limiter is None:
            await self.app(scope, receive, send)
            return
        address = address_key(_source(scope))
        wait = limiter.blocked(address, guard.clock())
        state = _request_state(scope)
        if wait > 0:
            state[AUTH_BLOCKED] = True
            api.metrics.api_rate_limited_total.labels(scope="auth").inc()
            body, headers = _too_many(
                f"too many failed authentications from this address; retry after "
                f"{_retry_after(wait)} s",
                "auth",
                wait,
            )
            await _respond(scope, receive, send, 429, body, headers)
            return

        async def watch(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and message["status"] == 401
                and not state.get(AUTHENTICATED)
                # an ended console session guessed nothing (its token was valid once)
                and state.get("auth_failure") is not auth.Reason.SESSION_EXPIRED
                and limiter.failed(address, guard.clock())
            ):
                log.warning(
                    "source address blocked after failed authentications",
                    source=address,
                    block_s=limiter.block_s,
                )
            await send(message)

        await self.app(scope, receive, watch)


def audited(state: dict[str, Any], method: str, status: int) -> bool:
    """Whether a call goes into the audit trail: a call that is not GET/HEAD/OPTIONS with
    a key that passed the check (not a 429), or a refusal by the key check (401/403)."""
    if state.get(AUTH_BLOCKED):
        return False
    if state.get(AUTHENTICATED):
        return method not in SAFE_METHODS and status != 429
    return status in (401, 403)


class _Call:
    """What the audit middleware gathers about one request."""

    def __init__(self, scope: Scope, request_id: str, at: dt.datetime, started: float) -> None:
        self.scope = scope
        self.request_id = request_id
        self.at = at
        self.started = started
        self.body = bytearray()
        self.body_bytes = 0
        self.body_whole = True
        self.status = 500
        self.answer = bytearray()
        self.answer_json = False
        self.held_bytes = 0

    def take_body(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        if len(self.body) + len(chunk) <= CAPTURE_LIMIT:
            self.body += chunk
        else:
            self.body_whole = False

    def take_answer(self, chunk: bytes) -> None:
        if self.answer_json and len(self.answer) + len(chunk) <= CAPTURE_LIMIT:
            self.answer += chunk
        else:
            self.answer_json = False

    def record(self, state: dict[str, Any], duration_s: float, bare: bool = False) -> CallRecord:
        """The row of the call; ``bare``: without what is read from the bodies."""
        scope = self.scope
        key_id, key_name = _key_identity(state)
        token = _bearer(scope)
        failure = state.get("auth_failure")
        if failure is None and not state.get(AUTHENTICATED):
            failure = "no key" if _header(scope, b"authorization") is None else "key refused"
        params = scope.get("path_params") or {}
        device_id = params.get("device_id")
        refs = call_audit.Refs([], [], [], None)
        if not bare and 200 <= self.status < 300 and self.answer_json and self.answer:
            with contextlib.suppress(ValueError, RecursionError):
                refs = call_audit.created_refs(json.loads(self.answer))
        orders = list(refs.order_nos)
        named = params.get("order_no")
        if isinstance(named, str) and named.upper() not in orders:
            orders.insert(0, named.upper())  # order numbers are upper case (commands.py)
        body, excerpt = None, None
        if not bare:
            body, excerpt = call_audit.audit_body(
                bytes(self.body), _header(scope, b"content-type"), self.body_whole
            )
        return CallRecord(
            at=self.at,
            request_id=self.request_id,
            key_id=key_id,
            key_name=key_name,
            key_fingerprint=fingerprint(token) if token else None,
            auth_failure=None if failure is None else str(getattr(failure, "value", failure)),
            source=_source(scope),
            method=scope["method"],
            path=scope["path"],
            query=call_audit.mask_query(scope.get("query_string", b"").decode("latin-1")),
            body=body,
            body_excerpt=excerpt,
            body_bytes=self.body_bytes,
            status=self.status,
            duration_ms=round(duration_s * 1000.0, 3),
            device_id=device_id if isinstance(device_id, str) else None,
            order_nos=orders,
            command_ids=refs.command_ids,
            job_ids=refs.job_ids,
            resource_id=refs.resource_id,
        )


class CallAuditMiddleware:
    """``X-Request-Id`` on every answer; audited calls recorded before their answer goes
    out (held until the row is committed, or held for a retry)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = _api_state(scope).guard
        supplied = _header(scope, b"x-request-id")
        request_id = supplied if supplied and _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        header = (b"x-request-id", request_id.encode())
        # what the call changes, it causes (events name the request id, as call_audit does)
        with causes.using(Cause.api(request_id)):
            await self._call(scope, receive, send, guard, request_id, header)

    async def _call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        guard: Guard,
        request_id: str,
        header: tuple[bytes, bytes],
    ) -> None:
        writer = guard.audit
        if writer is None:

            async def tag(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), header]}
                await send(message)

            await self.app(scope, receive, tag)
            return
        state = _request_state(scope)
        call = _Call(scope, request_id, guard.wall(), guard.clock())
        writes = scope["method"] not in SAFE_METHODS
        held: list[Message] = []
        holding = False
        answered = False
        recorded = False

        async def capture() -> Message:
            message = await receive()
            if writes and message["type"] == "http.request":
                call.take_body(message.get("body", b""))
            return message

        async def store() -> None:
            nonlocal recorded
            recorded = True
            duration = guard.clock() - call.started
            try:
                row = call.record(state, duration)
            except Exception:  # a defect must cost the call neither its answer nor its row
                log.exception("call audit row kept without its bodies", path=scope["path"])
                row = call.record(state, duration, bare=True)
            await writer.record(row)

        async def hold(message: Message) -> None:
            nonlocal holding, answered
            if message["type"] == "http.response.start":
                answered = True
                call.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
                holding = audited(state, scope["method"], call.status)
                if not holding:
                    await send(message)
                    return
                content_type = dict(message["headers"]).get(b"content-type", b"")
                call.answer_json = call_audit.is_json(content_type.decode("latin-1"))
                held.append(message)
                return
            if not holding or message["type"] != "http.response.body":
                await send(message)
                return
            chunk = message.get("body", b"")
            call.take_answer(chunk)
            call.held_bytes += len(chunk)
            held.append(message)
            more = message.get("more_body", False)
            if more and call.held_bytes <= CAPTURE_LIMIT:
                return
            if more:
                holding = False  # a long answer goes out as it comes, recorded at its end
            else:
                await store()
            for waiting in held:
                await send(waiting)
            held.clear()

        try:
            await self.app(scope, capture, hold)
        except BaseException:
            if not answered or held:  # nothing went out: the client gets a 500
                call.status = 500
            if not recorded and audited(state, scope["method"], call.status):
                await store()
            raise
        if answered and not recorded and audited(state, scope["method"], call.status):
            await store()


def install(app: FastAPI) -> None:
    """Add the middlewares of this module to ``app`` (after its others: outermost; the
    last added is the outermost)."""
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(FailedAuthMiddleware)
    app.add_middleware(CallAuditMiddleware)
    app.add_middleware(InFlightMiddleware)
